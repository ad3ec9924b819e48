"""Generates the Grafana dashboards in ``dashboards/grafana/`` (the single source of truth).

The JSON files are committed so users can import them without Python; this script is what a
developer edits. ``tests/test_dashboards.py`` fails when the committed JSON differs from what
this script produces, so the two never drift.

Usage::

    python dashboards/generate.py            # rewrite dashboards/grafana/*.json
    python dashboards/generate.py --check    # exit 1 (listing the files) when they are stale
    python dashboards/generate.py --out DIR  # write the dashboards somewhere else

Only the standard library is used. The JSON targets Grafana 10 and 11 (``schemaVersion`` 39):
every panel queries the ``datasource`` template variable (a Prometheus data source chosen on
the dashboard, never a hard-coded uid), so the files import as they are.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 39  # Grafana 10.4 and 11.x read it without migration.
OUTPUT_DIR = Path(__file__).resolve().parent / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TAG = "asyncsentinel"

# Label names, as the instrument catalogue (src/asyncsentinel/instruments.py) defines them.
POOL = "db_client_connection_pool_name"
STATE = "db_client_connection_state"
ROUTE = "http_route"
HOST = "server_address"

# Every selector starts with the job/instance variables; they are multi-value, so always =~.
SEL = 'job=~"$job", instance=~"$instance"'
POOL_SEL = f'{SEL}, {POOL}=~"$pool"'
ROUTE_SEL = f'{SEL}, {ROUTE}=~"$route"'
HOST_SEL = f'{SEL}, {HOST}=~"$host"'
RATE = "[$__rate_interval]"

# Thresholds shared by panels and documented in dashboards/README.md.
SATURATION = (("green", None), ("orange", 0.8), ("red", 0.95))
LAG = (("green", None), ("orange", 0.05), ("red", 0.1))  # loop_block_seconds defaults to 0.1 s
CHECKOUT_WAIT = (("green", None), ("orange", 0.05), ("red", 0.1))  # pool_wait_seconds 0.1 s
ANY_IS_BAD = (("green", None), ("red", 0.01))
NEUTRAL = (("blue", None),)
LOW_IS_BAD = (("red", None), ("orange", 0.5), ("green", 0.8))

Steps = Sequence[tuple[str, float | None]]


def _thresholds(steps: Steps) -> dict[str, Any]:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for color, value in steps],
    }


def quantile(q: float, metric: str, selector: str, by: str) -> str:
    """``histogram_quantile`` of a catalogue histogram, grouped by *by* (plus ``le``)."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}{RATE})))"


def per_minute(metric: str, selector: str, by: str) -> str:
    """A counter's rate per minute, summed by *by*: rare events read better per minute."""
    return f"sum by ({by}) (rate({metric}{{{selector}}}{RATE})) * 60"


def findings(kinds: Iterable[str], selector: str = ROUTE_SEL, by: str = "kind, http_route") -> str:
    """Findings of the given kinds per minute (``asyncsentinel_findings_total``)."""
    pattern = "|".join(sorted(kinds))
    return per_minute("asyncsentinel_findings_total", f'{selector}, kind=~"{pattern}"', by)


def pool_saturation(selector: str = POOL_SEL) -> str:
    """Used connections / maximum, per pool and instance (a pool with max 0 is left out)."""
    return (
        f'sum without ({STATE}) (db_client_connection_count{{{selector}, {STATE}="used"}})\n'
        f"/ (db_client_connection_max{{{selector}}} > 0)"
    )


@dataclass
class Target:
    """One PromQL query of a panel."""

    expr: str
    legend: str = "__auto"
    instant: bool = False


@dataclass
class Panel:
    """A panel before layout; rows have ``kind == "row"``."""

    kind: str
    title: str
    description: str = ""
    targets: list[Target] = field(default_factory=list)
    unit: str = ""
    steps: Steps = NEUTRAL
    width: int = 12
    height: int = 8
    minimum: float | None = None
    maximum: float | None = None
    threshold_lines: bool = False
    dashed: str = ""
    """Regex of series names drawn dashed without fill (limits such as a pool's maximum)."""
    stacked: bool = False


def row(title: str) -> Panel:
    """A row header spanning the dashboard."""
    return Panel("row", title, width=24, height=1)


def timeseries(title: str, description: str, *targets: Target, **options: Any) -> Panel:
    """A time series panel."""
    return Panel("timeseries", title, description, list(targets), **options)


def stat(title: str, description: str, target: Target, **options: Any) -> Panel:
    """A single-value panel (last value), coloured by its thresholds."""
    options.setdefault("width", 4)
    options.setdefault("height", 4)
    return Panel("stat", title, description, [target], **options)


def gauge(title: str, description: str, target: Target, **options: Any) -> Panel:
    """A gauge panel."""
    return Panel("gauge", title, description, [target], **options)


def bars(title: str, description: str, target: Target, **options: Any) -> Panel:
    """A horizontal bar gauge of an instant query (top-N lists)."""
    target.instant = True
    return Panel("bargauge", title, description, [target], **options)


def _field_config(panel: Panel) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": _thresholds(panel.steps),
        "mappings": [],
    }
    if panel.minimum is not None:
        defaults["min"] = panel.minimum
    if panel.maximum is not None:
        defaults["max"] = panel.maximum
    overrides: list[dict[str, Any]] = []
    if panel.kind == "timeseries":
        defaults["color"] = {"mode": "palette-classic"}
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"group": "A", "mode": "normal" if panel.stacked else "none"},
            "thresholdsStyle": {"mode": "line+area" if panel.threshold_lines else "off"},
        }
        if panel.dashed:
            overrides.append(
                {
                    "matcher": {"id": "byRegexp", "options": panel.dashed},
                    "properties": [
                        {
                            "id": "custom.lineStyle",
                            "value": {"dash": [10, 10], "fill": "dash"},
                        },
                        {"id": "custom.fillOpacity", "value": 0},
                    ],
                }
            )
    else:
        defaults["color"] = {"mode": "thresholds"}
    return {"defaults": defaults, "overrides": overrides}


_REDUCE = {"calcs": ["lastNotNull"], "fields": "", "values": False}


def _options(panel: Panel) -> dict[str, Any]:
    if panel.kind == "timeseries":
        return {
            "legend": {
                "calcs": [],
                "displayMode": "list",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if panel.kind == "stat":
        return {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": _REDUCE,
            "textMode": "auto",
        }
    if panel.kind == "gauge":
        return {
            "orientation": "auto",
            "reduceOptions": _REDUCE,
            "showThresholdLabels": False,
            "showThresholdMarkers": True,
        }
    return {
        "displayMode": "gradient",
        "orientation": "horizontal",
        "reduceOptions": _REDUCE,
        "showUnfilled": True,
        "valueMode": "color",
    }


def _render(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    grid = {"h": panel.height, "w": panel.width, "x": x, "y": y}
    if panel.kind == "row":
        return {
            "collapsed": False,
            "gridPos": grid,
            "id": panel_id,
            "panels": [],
            "title": panel.title,
            "type": "row",
        }
    targets = []
    for index, target in enumerate(panel.targets):
        targets.append(
            {
                "datasource": dict(DATASOURCE),
                "editorMode": "code",
                "expr": target.expr,
                "instant": target.instant,
                "legendFormat": target.legend,
                "range": not target.instant,
                "refId": chr(ord("A") + index),
            }
        )
    return {
        "datasource": dict(DATASOURCE),
        "description": panel.description,
        "fieldConfig": _field_config(panel),
        "gridPos": grid,
        "id": panel_id,
        "options": _options(panel),
        "targets": targets,
        "title": panel.title,
        "type": panel.kind,
    }


def _layout(panels: Sequence[Panel]) -> list[dict[str, Any]]:
    """Place panels left to right, wrapping at Grafana's 24 columns; rows start a new line."""
    rendered: list[dict[str, Any]] = []
    x = y = line_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        if panel.kind == "row" or x + panel.width > 24:
            y += line_height
            x = line_height = 0
        rendered.append(_render(panel, panel_id, x, y))
        x += panel.width
        line_height = max(line_height, panel.height)
        if panel.kind == "row":
            y += 1
            x = line_height = 0
    return rendered


# --- template variables ---------------------------------------------------------------------------
def _datasource_variable() -> dict[str, Any]:
    return {
        "current": {},
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
        "type": "datasource",
    }


def _query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": dict(DATASOURCE),
        "definition": query,
        "hide": 0,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }


# asyncsentinel_asyncio_tasks is unlabelled, so it is exposed from the first scrape on: every
# instrumented process has it, whatever traffic it has seen.
PRESENCE_METRIC = "asyncsentinel_asyncio_tasks"
VARIABLES: dict[str, tuple[str, str]] = {
    "job": ("Job", f"label_values({PRESENCE_METRIC}, job)"),
    "instance": ("Instance", f'label_values({PRESENCE_METRIC}{{job=~"$job"}}, instance)'),
    "pool": ("Pool", f"label_values(db_client_connection_max{{{SEL}}}, {POOL})"),
    "route": (
        "Route",
        f"label_values(http_server_request_duration_seconds_count{{{SEL}}}, {ROUTE})",
    ),
    "host": (
        "Upstream host",
        f"label_values(http_client_request_duration_seconds_count{{{SEL}}}, {HOST})",
    ),
}


@dataclass
class Dashboard:
    """One dashboard: identity, extra variables beyond datasource/job/instance, panels."""

    uid: str
    title: str
    description: str
    variables: tuple[str, ...]
    panels: list[Panel]

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"

    def render(self) -> dict[str, Any]:
        """The Grafana dashboard JSON model."""
        variables = [_datasource_variable()]
        for name in ("job", "instance", *self.variables):
            label, query = VARIABLES[name]
            variables.append(_query_variable(name, label, query))
        return {
            "annotations": {
                "list": [
                    {
                        "builtIn": 1,
                        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                        "enable": True,
                        "hide": True,
                        "iconColor": "rgba(0, 211, 255, 1)",
                        "name": "Annotations & Alerts",
                        "type": "dashboard",
                    },
                    {
                        # Firing asyncsentinel alerts as annotations: where the trouble started.
                        "datasource": dict(DATASOURCE),
                        "enable": True,
                        "expr": 'ALERTS{alertname=~"AsyncSentinel.+", alertstate="firing", '
                        f"{SEL}}}",
                        "iconColor": "red",
                        "name": "asyncsentinel alerts",
                        "step": "60s",
                        "textFormat": "{{severity}} {{db_client_connection_pool_name}}"
                        "{{http_route}}{{component}}",
                        "titleFormat": "{{alertname}}",
                        "useValueForTime": False,
                    },
                ]
            },
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "id": None,
            "links": [
                {
                    "asDropdown": False,
                    "icon": "external link",
                    "includeVars": True,
                    "keepTime": True,
                    "tags": [TAG],
                    "targetBlank": False,
                    "title": "asyncsentinel",
                    "type": "dashboards",
                }
            ],
            "panels": _layout(self.panels),
            "refresh": "30s",
            "schemaVersion": SCHEMA_VERSION,
            "tags": [TAG],
            "templating": {"list": variables},
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
            "weekStart": "",
        }


# --- the dashboards -------------------------------------------------------------------------------
def overview() -> Dashboard:
    """Request rate/latency/errors by route, findings, loop lag, the busiest pool."""
    requests = f"http_server_request_duration_seconds_count{{{ROUTE_SEL}}}"
    errors = (
        f"http_server_request_duration_seconds_count"
        f'{{{ROUTE_SEL}, http_response_status_code=~"5.."}}'
    )
    panels = [
        row("At a glance"),
        stat(
            "Requests per second",
            "HTTP requests handled by the selected instances. If it drops while clients still "
            "send traffic, requests are stuck: check event-loop lag and pool waiters below.",
            Target(f"sum(rate({requests}{RATE}))"),
            unit="reqps",
        ),
        stat(
            "Server errors (5xx)",
            "Share of responses with a 5xx status. When red: open the route breakdown below; "
            "pool checkout timeouts (Database pools) are a common cause of bursts of 500/503.",
            Target(f"(sum(rate({errors}{RATE})) or vector(0))\n/ sum(rate({requests}{RATE}))"),
            unit="percentunit",
            steps=(("green", None), ("orange", 0.01), ("red", 0.05)),
        ),
        stat(
            "Latency p99",
            "99th percentile of request duration over all routes. When red: find the route in "
            "'Latency p99 by route', then look for pool waits, N+1 findings or blocked-loop "
            "incidents on it.",
            Target(quantile(0.99, "http_server_request_duration_seconds", ROUTE_SEL, "")),
            unit="s",
            steps=(("green", None), ("orange", 0.5), ("red", 1.0)),
        ),
        stat(
            "Findings per minute",
            "Mistakes asyncsentinel detected, all kinds. When not green: 'Top offending routes' "
            "says where; each finding is also a log line naming the file:line responsible.",
            Target(f"sum(rate(asyncsentinel_findings_total{{{ROUTE_SEL}}}{RATE})) * 60"),
            unit="opm",
            steps=(("green", None), ("orange", 1), ("red", 10)),
        ),
        stat(
            "Event loop lag p99",
            "How late callbacks run on the event loop. When red, something blocks the loop "
            "(sync I/O, CPU work): open the Event loop & tasks dashboard for the route.",
            Target(quantile(0.99, "asyncsentinel_event_loop_lag_seconds", SEL, "")),
            unit="s",
            steps=LAG,
        ),
        stat(
            "Busiest DB pool",
            "Saturation (used / max connections) of the fullest pool. Orange at 80 %, red at "
            "95 %: requests are about to queue for connections; open Database pools.",
            Target(f"max(\n{pool_saturation(SEL)}\n)"),
            unit="percentunit",
            steps=SATURATION,
            minimum=0,
            maximum=1,
        ),
        row("HTTP server by route"),
        timeseries(
            "Request rate by route",
            "Requests per second per route template. A route whose rate jumps while others "
            "fall is often the one starving a shared pool or the loop.",
            Target(f"sum by ({ROUTE}) (rate({requests}{RATE}))", "{{http_route}}"),
            unit="reqps",
        ),
        timeseries(
            "Latency p99 by route",
            "99th percentile per route (lines at 0.5 s and 1 s). When a route is red: check its "
            "queries per request and N+1 findings (Database pools) and blocked-loop incidents.",
            Target(
                quantile(0.99, "http_server_request_duration_seconds", ROUTE_SEL, ROUTE),
                "{{http_route}}",
            ),
            unit="s",
            steps=(("green", None), ("orange", 0.5), ("red", 1.0)),
            threshold_lines=True,
        ),
        timeseries(
            "Server error ratio by route",
            "Share of 5xx responses per route. When red: pool timeouts show as 500/503 on every "
            "route using the pool; a single route failing points at its own code.",
            Target(
                f"sum by ({ROUTE}) (rate({errors}{RATE}))\n"
                f"/ sum by ({ROUTE}) (rate({requests}{RATE}))",
                "{{http_route}}",
            ),
            unit="percentunit",
            steps=(("green", None), ("orange", 0.01), ("red", 0.05)),
            threshold_lines=True,
        ),
        timeseries(
            "In-flight requests",
            "Requests being handled right now. Rising with flat throughput means requests queue "
            "on something: a pool (waiters), the event loop (lag) or an upstream (HTTP client).",
            Target(
                f"sum by (instance) (http_server_active_requests{{{SEL}}})",
                "{{instance}}",
            ),
            unit="short",
        ),
        row("Findings"),
        timeseries(
            "Findings by kind",
            "Findings per minute by kind. Each kind has its panel on the Database pools, Event "
            "loop & tasks or HTTP client dashboard; the log line of each finding names the "
            "responsible file:line.",
            Target(
                per_minute("asyncsentinel_findings_total", ROUTE_SEL, "kind"),
                "{{kind}}",
            ),
            unit="opm",
            stacked=True,
        ),
        bars(
            "Top offending routes",
            "Routes with the most findings in the selected time range, by kind. Fix the top bar "
            "first: search the logs for 'asyncsentinel <kind> on <route>' for the culprit line.",
            Target(
                "topk(10, sum by (http_route, kind) "
                f"(increase(asyncsentinel_findings_total{{{ROUTE_SEL}}}[$__range])) > 0)",
                "{{kind}} on {{http_route}}",
            ),
            unit="short",
            steps=(("orange", None), ("red", 10)),
        ),
        timeseries(
            "Event loop lag",
            "Median and 99th percentile delay of the heartbeat on each instance's event loop. "
            "Sustained p99 above 0.1 s (red line): blocked-loop incidents on the Event loop "
            "dashboard name the blocking route and line.",
            Target(
                quantile(0.5, "asyncsentinel_event_loop_lag_seconds", SEL, "instance"),
                "p50 {{instance}}",
            ),
            Target(
                quantile(0.99, "asyncsentinel_event_loop_lag_seconds", SEL, "instance"),
                "p99 {{instance}}",
            ),
            unit="s",
            steps=LAG,
            threshold_lines=True,
        ),
        timeseries(
            "asyncsentinel internal errors",
            "Errors inside asyncsentinel itself, by component. They never reach requests, but "
            "findings from that component may be missing: read the 'asyncsentinel' logger's "
            "error record and report it with the traceback.",
            Target(
                per_minute("asyncsentinel_instrumentation_errors_total", SEL, "component"),
                "{{component}}",
            ),
            unit="opm",
            steps=ANY_IS_BAD,
        ),
    ]
    return Dashboard(
        "asyncsentinel-overview",
        "asyncsentinel / Overview",
        "Requests, errors and latency by route, findings, event-loop lag and pool saturation.",
        ("route",),
        panels,
    )


def database_pools() -> Dashboard:
    """Per pool: usage, saturation, waiters, checkout wait, timeouts, hold time, queries."""
    wait = "db_client_connection_wait_time_seconds"
    hold = "db_client_connection_use_time_seconds"
    create = "db_client_connection_create_time_seconds"
    operation = "db_client_operation_duration_seconds"
    queries = "asyncsentinel_request_db_queries"
    pool_legend = "{{db_client_connection_pool_name}}"
    panels = [
        row("Saturation"),
        gauge(
            "Pool saturation now",
            "Used connections / maximum (pool_size + max_overflow) of each pool, on its fullest "
            "instance. Orange at 80 %, red at 95 %: new checkouts are about to wait. Raise "
            "pool_size/max_overflow only if the database can take it; first look for long "
            "connection hold times and N+1 routes below.",
            Target(f"max by ({POOL}) (\n{pool_saturation()}\n)", pool_legend),
            unit="percentunit",
            steps=SATURATION,
            minimum=0,
            maximum=1,
            width=6,
        ),
        timeseries(
            "Pool saturation by instance",
            "Used / maximum connections over time (lines at 80 % and 95 %). Sustained red is "
            "what AsyncSentinelDBPoolSaturated alerts on: checkouts queue, then time out.",
            Target(pool_saturation(), f"{pool_legend} on {{{{instance}}}}"),
            unit="percentunit",
            steps=SATURATION,
            minimum=0,
            maximum=1,
            threshold_lines=True,
            width=18,
        ),
        row("Connections and waiters"),
        timeseries(
            "Connections: used, idle, max",
            "Checked-out (used) and pooled idle connections per pool; the dashed line is the "
            "maximum. Used pinned at the maximum means the pool is exhausted.",
            Target(
                f"sum by ({POOL}, {STATE}) (db_client_connection_count{{{POOL_SEL}}})",
                f"{pool_legend} {{{{{STATE}}}}}",
            ),
            Target(
                f"sum by ({POOL}) (db_client_connection_max{{{POOL_SEL}}})",
                f"{pool_legend} max",
            ),
            unit="short",
            dashed=".* max$",
            width=8,
        ),
        timeseries(
            "Waiters",
            "Tasks waiting for a connection right now. Any sustained value means requests "
            "queue for the pool: see connection hold time and queries per request; "
            "AsyncSentinelDBPoolWaitersQueueing fires after 5 minutes.",
            Target(
                f"sum by ({POOL}) (db_client_connection_pending_requests{{{POOL_SEL}}})",
                pool_legend,
            ),
            unit="short",
            steps=(("green", None), ("orange", 1), ("red", 10)),
            threshold_lines=True,
            width=8,
        ),
        timeseries(
            "Checkout timeouts per minute",
            "Checkouts that gave up waiting (SQLAlchemy 'QueuePool limit ... reached', asyncpg "
            "acquire timeout): each is a failed request. Any value is red and pages "
            "(AsyncSentinelDBPoolExhausted): look for pool_exhausted and connection_leaked "
            "findings below for the route holding connections.",
            Target(per_minute("db_client_connection_timeouts_total", POOL_SEL, POOL), pool_legend),
            unit="opm",
            steps=ANY_IS_BAD,
            threshold_lines=True,
            width=8,
        ),
        row("Checkout wait and hold time"),
        timeseries(
            "Checkout wait p50 / p99",
            "Time to obtain a connection from the pool (red line at 0.1 s, the pool_wait_seconds "
            "default). High wait with the pool saturated: connections are held too long or the "
            "pool is too small for the concurrency.",
            Target(quantile(0.5, wait, POOL_SEL, POOL), f"p50 {pool_legend}"),
            Target(quantile(0.99, wait, POOL_SEL, POOL), f"p99 {pool_legend}"),
            unit="s",
            steps=CHECKOUT_WAIT,
            threshold_lines=True,
        ),
        timeseries(
            "Connection hold time p50 / p99",
            "Checkout to checkin. Long holds starve other requests: do not keep a session open "
            "across HTTP calls, sleeps or slow work; release it before. Holds that outlive the "
            "request are reported as connection_leaked findings.",
            Target(quantile(0.5, hold, POOL_SEL, POOL), f"p50 {pool_legend}"),
            Target(quantile(0.99, hold, POOL_SEL, POOL), f"p99 {pool_legend}"),
            unit="s",
            steps=(("green", None), ("orange", 1.0), ("red", 5.0)),
            threshold_lines=True,
        ),
        timeseries(
            "New connections per second",
            "Connections opened by the pool. A steady stream means churn: overflow connections "
            "opened and closed under load (raise pool_size), pool_recycle too low, or "
            "connections invalidated by pre-ping after database restarts.",
            Target(f"sum by ({POOL}) (rate({create}_count{{{POOL_SEL}}}{RATE}))", pool_legend),
            unit="ops",
        ),
        timeseries(
            "Connect time p99",
            "Time to open a new database connection (TCP, TLS, authentication). When high: "
            "the database or network is slow, and every overflow connection pays it.",
            Target(quantile(0.99, create, POOL_SEL, POOL), pool_legend),
            unit="s",
            steps=(("green", None), ("orange", 0.1), ("red", 1.0)),
            threshold_lines=True,
        ),
        row("Queries"),
        timeseries(
            "Queries per request by route",
            "Statements executed per HTTP request (mean and p99). A route far above the others "
            "usually loads related rows one by one: see its N+1 findings and use selectinload "
            "or a join.",
            Target(
                f"sum by ({ROUTE}) (rate({queries}_sum{{{ROUTE_SEL}}}{RATE}))\n"
                f"/ sum by ({ROUTE}) (rate({queries}_count{{{ROUTE_SEL}}}{RATE}))",
                "mean {{http_route}}",
            ),
            Target(quantile(0.99, queries, ROUTE_SEL, ROUTE), "p99 {{http_route}}"),
            unit="short",
            steps=(("green", None), ("orange", 10), ("red", 50)),
            threshold_lines=True,
        ),
        timeseries(
            "Statement duration p99 by operation",
            "99th percentile duration of statements by operation (SELECT, INSERT, ...) and pool; "
            "red line at 0.5 s, the slow_query_seconds default. When red: slow_query findings "
            "name the statement shape and the line that ran it.",
            Target(
                quantile(0.99, operation, POOL_SEL, f"{POOL}, db_operation_name"),
                f"{{{{db_operation_name}}}} {pool_legend}",
            ),
            unit="s",
            steps=(("green", None), ("orange", 0.1), ("red", 0.5)),
            threshold_lines=True,
        ),
        timeseries(
            "Statements per second",
            "Statements executed per second by operation and pool. A jump without more "
            "requests means more queries per request (N+1).",
            Target(
                f"sum by ({POOL}, db_operation_name) (rate({operation}_count{{{POOL_SEL}}}{RATE}))",
                f"{{{{db_operation_name}}}} {pool_legend}",
            ),
            unit="ops",
        ),
        stat(
            "Configuration advice",
            "Start-up advice asyncsentinel gave about engines and sessions (pool_pre_ping off, "
            "expire_on_commit on async sessions, relationships without a loading strategy). "
            "Read the INFO log lines 'asyncsentinel db_configuration_advice' for each item.",
            Target(
                'sum(asyncsentinel_findings_total{job=~"$job", instance=~"$instance", '
                'kind="db_configuration_advice"}) or vector(0)'
            ),
            unit="short",
            steps=(("green", None), ("orange", 1)),
            width=12,
            height=8,
        ),
        row("Database findings"),
        timeseries(
            "N+1 findings by route",
            "Requests that ran one statement shape at least n_plus_one_threshold times. Fix: the "
            "log line names the statement and the loop that issued it; load the related rows "
            "with selectinload/joinedload or one IN query.",
            Target(findings(["n_plus_one"], by=ROUTE), "{{http_route}}"),
            unit="opm",
            steps=ANY_IS_BAD,
        ),
        timeseries(
            "Pool findings by route",
            "pool_exhausted (a checkout waited or timed out), connection_leaked (a connection "
            "still checked out after its request ended), engine_created_in_request and "
            "pool_not_disposed. Fix leaks first: they turn into exhaustion.",
            Target(
                findings(
                    [
                        "pool_exhausted",
                        "connection_leaked",
                        "engine_created_in_request",
                        "pool_not_disposed",
                    ]
                ),
                "{{kind}} on {{http_route}}",
            ),
            unit="opm",
            steps=ANY_IS_BAD,
        ),
        timeseries(
            "Session and query findings by route",
            "session_shared_across_tasks (one AsyncSession used by two tasks: give each task its "
            "own), sync_db_on_event_loop (a sync driver blocking the loop: use the async engine), "
            "lazy_load_in_async (an implicit lazy load: load it explicitly), slow_query.",
            Target(
                findings(
                    [
                        "session_shared_across_tasks",
                        "sync_db_on_event_loop",
                        "lazy_load_in_async",
                        "slow_query",
                    ]
                ),
                "{{kind}} on {{http_route}}",
            ),
            unit="opm",
            steps=ANY_IS_BAD,
            width=24,
        ),
    ]
    return Dashboard(
        "asyncsentinel-db-pools",
        "asyncsentinel / Database pools",
        "Connection pools (SQLAlchemy and asyncpg): saturation, waiters, checkout wait, timeouts, "
        "hold time, queries per request and database findings.",
        ("pool", "route"),
        panels,
    )


def event_loop() -> Dashboard:
    """Lag, blocked incidents, tasks, task findings and the to_thread pool."""
    lag = "asyncsentinel_event_loop_lag_seconds"
    blocked = "asyncsentinel_event_loop_blocked_seconds"
    busy = f"asyncsentinel_thread_pool_busy_threads{{{SEL}}}"
    threads_max = f"asyncsentinel_thread_pool_max_threads{{{SEL}}}"
    panels = [
        row("Event loop"),
        stat(
            "Lag p99",
            "How late the heartbeat callback ran, all instances. Red above 0.1 s (the "
            "loop_block_seconds default): some code blocks the loop; see incidents by route.",
            Target(quantile(0.99, lag, SEL, "")),
            unit="s",
            steps=LAG,
        ),
        stat(
            "Blocked incidents",
            "Times the loop did not run any other callback for longer than loop_block_seconds, "
            "in the selected range. Each one has a log line with the blocking line of code.",
            Target(f"sum(increase({blocked}_count{{{ROUTE_SEL}}}[$__range])) or vector(0)"),
            unit="short",
            steps=(("green", None), ("orange", 1), ("red", 10)),
        ),
        stat(
            "Time blocked",
            "Share of wall-clock time the loop was blocked, on the worst instance. Every request "
            "on that instance waits meanwhile: fix the route in 'Blocked time by route'.",
            Target(
                f"max(sum by (job, instance) (rate({blocked}_sum{{{ROUTE_SEL}}}{RATE}))) "
                "or vector(0)"
            ),
            unit="percentunit",
            steps=(("green", None), ("orange", 0.01), ("red", 0.05)),
        ),
        stat(
            "Live tasks",
            "asyncio tasks alive on the instrumented loops. If it only grows, tasks leak: see "
            "task_leaked findings below.",
            Target(f"sum({PRESENCE_METRIC}{{{SEL}}})"),
            unit="short",
        ),
        stat(
            "to_thread pool busy",
            "Busy threads / maximum of the default executor (asyncio.to_thread, "
            "run_in_executor) on the busiest instance. Red: sync work queues; raise the "
            "executor size or move the work to a process pool.",
            Target(
                f"max(sum by (job, instance) ({busy})\n/ sum by (job, instance) "
                f"({threads_max} > 0))"
            ),
            unit="percentunit",
            steps=SATURATION,
            minimum=0,
            maximum=1,
        ),
        stat(
            "to_thread queue",
            "Work items waiting for a thread in the default executor, all instances. Anything "
            "queued waits for a thread while its request waits too.",
            Target(f"sum(asyncsentinel_thread_pool_queued_tasks{{{SEL}}})"),
            unit="short",
            steps=(("green", None), ("orange", 1), ("red", 10)),
        ),
        timeseries(
            "Event loop lag p50 / p99",
            "Heartbeat delay per instance (lines at 50 ms and 100 ms). Sustained p99 above "
            "0.1 s is what AsyncSentinelEventLoopLagHigh alerts on.",
            Target(quantile(0.5, lag, SEL, "instance"), "p50 {{instance}}"),
            Target(quantile(0.99, lag, SEL, "instance"), "p99 {{instance}}"),
            unit="s",
            steps=LAG,
            threshold_lines=True,
        ),
        timeseries(
            "Blocked incidents per minute by route",
            "Incidents per route ('' = outside any request: startup, background tasks). The log "
            "line 'asyncsentinel event_loop_blocked on <route>' names the blocking line: replace "
            "sync I/O with its async version or move CPU work to asyncio.to_thread.",
            Target(per_minute(f"{blocked}_count", ROUTE_SEL, ROUTE), "{{http_route}}"),
            unit="opm",
            steps=ANY_IS_BAD,
        ),
        timeseries(
            "Blocked time by route",
            "Share of wall-clock time each route kept the loop blocked, per instance. The route "
            "with the largest share hurts every other request on that instance the most.",
            Target(
                f"sum by (instance, {ROUTE}) (rate({blocked}_sum{{{ROUTE_SEL}}}{RATE}))",
                "{{http_route}} on {{instance}}",
            ),
            unit="percentunit",
            steps=(("green", None), ("orange", 0.01), ("red", 0.05)),
            threshold_lines=True,
        ),
        timeseries(
            "Blocked incident duration p50 / p99 by route",
            "How long single incidents last. Long incidents (seconds) are usually sync network "
            "calls (requests, sync DB drivers); many short ones are CPU work in a loop.",
            Target(quantile(0.5, blocked, ROUTE_SEL, ROUTE), "p50 {{http_route}}"),
            Target(quantile(0.99, blocked, ROUTE_SEL, ROUTE), "p99 {{http_route}}"),
            unit="s",
            steps=LAG,
            threshold_lines=True,
        ),
        row("Tasks"),
        timeseries(
            "Live asyncio tasks by instance",
            "Live tasks per instance. Growth that does not follow traffic is a task leak: "
            "task_leaked findings name the line that created the task.",
            Target(f"sum by (instance) ({PRESENCE_METRIC}{{{SEL}}})", "{{instance}}"),
            unit="short",
        ),
        timeseries(
            "Task findings by route",
            "task_leaked (fire-and-forget task still running after the response: keep a "
            "reference, use a TaskGroup), cancellation_swallowed (a task caught CancelledError "
            "and returned: re-raise it), task_exception_unretrieved (nobody awaited a failed "
            "task).",
            Target(
                findings(
                    ["task_leaked", "cancellation_swallowed", "task_exception_unretrieved"],
                ),
                "{{kind}} on {{http_route}}",
            ),
            unit="opm",
            steps=ANY_IS_BAD,
        ),
        timeseries(
            "Loop-blocking findings by route",
            "event_loop_blocked and sync_db_on_event_loop findings. Both mean the loop could "
            "not serve other requests meanwhile; the log line names the blocking call.",
            Target(
                findings(["event_loop_blocked", "sync_db_on_event_loop"]),
                "{{kind}} on {{http_route}}",
            ),
            unit="opm",
            steps=ANY_IS_BAD,
        ),
        row("Default executor (asyncio.to_thread)"),
        timeseries(
            "Executor threads: busy, queued, max",
            "Busy threads, queued work items and the maximum (dashed) per instance. Queued work "
            "with busy at the maximum means to_thread calls wait for a thread.",
            Target(f"sum by (instance) ({busy})", "busy {{instance}}"),
            Target(
                f"sum by (instance) (asyncsentinel_thread_pool_queued_tasks{{{SEL}}})",
                "queued {{instance}}",
            ),
            Target(f"sum by (instance) ({threads_max})", "max {{instance}}"),
            unit="short",
            dashed="^max .*",
        ),
        timeseries(
            "Executor saturation",
            "Busy / maximum threads per instance (lines at 80 % and 95 %). When red: sync work "
            "queues behind other sync work; raise max_workers of the default executor or move "
            "long work off the request path.",
            Target(
                f"sum by (job, instance) ({busy})\n/ sum by (job, instance) ({threads_max} > 0)",
                "{{instance}}",
            ),
            unit="percentunit",
            steps=SATURATION,
            minimum=0,
            maximum=1,
            threshold_lines=True,
        ),
    ]
    return Dashboard(
        "asyncsentinel-event-loop",
        "asyncsentinel / Event loop & tasks",
        "Event-loop lag and blocked incidents by route, live tasks, task findings and the "
        "default executor behind asyncio.to_thread.",
        ("route",),
        panels,
    )


def http_client() -> Dashboard:
    """aiohttp client: latency by host, connector wait, connection reuse, DNS cache."""
    duration = "http_client_request_duration_seconds"
    wait = "http_client_connection_wait_time_seconds"
    connections = "asyncsentinel_http_client_connections_total"
    dns = "asyncsentinel_http_client_dns_cache_total"
    host = "{{server_address}}"
    panels = [
        row("Outgoing requests"),
        timeseries(
            "Requests per second by host",
            "Outgoing aiohttp requests per upstream host.",
            Target(f"sum by ({HOST}) (rate({duration}_count{{{HOST_SEL}}}{RATE}))", host),
            unit="reqps",
            width=8,
        ),
        timeseries(
            "Latency p50 / p99 by host",
            "Outgoing request duration per host (lines at 0.5 s and 2 s). A slow upstream holds "
            "your request, and any DB connection it keeps checked out, for that long: set a "
            "ClientTimeout and release sessions before calling out.",
            Target(quantile(0.5, duration, HOST_SEL, HOST), f"p50 {host}"),
            Target(quantile(0.99, duration, HOST_SEL, HOST), f"p99 {host}"),
            unit="s",
            steps=(("green", None), ("orange", 0.5), ("red", 2.0)),
            threshold_lines=True,
            width=8,
        ),
        timeseries(
            "Failed requests by host and status",
            "Responses other than 2xx/3xx per second (no status: the request failed before a "
            "response, e.g. connect error or timeout). When high: check the upstream's health "
            "and your timeouts and retries.",
            Target(
                f"sum by ({HOST}, http_response_status_code) (rate({duration}_count"
                f'{{{HOST_SEL}, http_response_status_code!~"[23].."}}{RATE}))',
                f"{host} {{{{http_response_status_code}}}}",
            ),
            unit="reqps",
            width=8,
        ),
        row("Connector"),
        timeseries(
            "Connector wait p50 / p99 by host",
            "Time requests waited for a free connection slot because TCPConnector(limit=..., "
            "limit_per_host=...) was reached (lines at 0.1 s and 1 s). When red: raise the "
            "limit, or reduce concurrency towards that host.",
            Target(quantile(0.5, wait, HOST_SEL, HOST), f"p50 {host}"),
            Target(quantile(0.99, wait, HOST_SEL, HOST), f"p99 {host}"),
            unit="s",
            steps=(("green", None), ("orange", 0.1), ("red", 1.0)),
            threshold_lines=True,
        ),
        timeseries(
            "Requests that waited for a connection slot",
            "Requests per second that had to wait in the connector queue, by host. Any steady "
            "value means the connector limit is the bottleneck.",
            Target(f"sum by ({HOST}) (rate({wait}_count{{{HOST_SEL}}}{RATE}))", host),
            unit="ops",
        ),
        timeseries(
            "Connection reuse by host",
            "Share of requests that reused a kept-alive connection. Low reuse (red below 50 %) "
            "means a new TCP/TLS handshake per request: usually a ClientSession created per "
            "request (see client_session_per_request findings) or keep-alive disabled.",
            Target(
                f'sum by ({HOST}) (rate({connections}{{{HOST_SEL}, state="reused"}}{RATE}))\n'
                f"/ sum by ({HOST}) (rate({connections}{{{HOST_SEL}}}{RATE}))",
                host,
            ),
            unit="percentunit",
            steps=LOW_IS_BAD,
            minimum=0,
            maximum=1,
            threshold_lines=True,
        ),
        timeseries(
            "Connections by host and state",
            "Connections obtained per second, newly created vs reused.",
            Target(
                f"sum by ({HOST}, state) (rate({connections}{{{HOST_SEL}}}{RATE}))",
                f"{host} {{{{state}}}}",
            ),
            unit="ops",
        ),
        timeseries(
            "DNS cache hit ratio",
            "Share of DNS lookups answered from aiohttp's cache, per instance. Low: the cache is "
            "off (use_dns_cache=False), its ttl_dns_cache is too short, or sessions (and their "
            "caches) are recreated per request.",
            Target(
                f'sum by (instance) (rate({dns}{{{SEL}, result="hit"}}{RATE}))\n'
                f"/ sum by (instance) (rate({dns}{{{SEL}}}{RATE}))",
                "{{instance}}",
            ),
            unit="percentunit",
            steps=LOW_IS_BAD,
            minimum=0,
            maximum=1,
        ),
        row("HTTP client findings"),
        timeseries(
            "ClientSession findings by route",
            "client_session_per_request (a ClientSession created and closed inside one request: "
            "create one per application in the lifespan and reuse it) and "
            "client_session_unclosed (a session never closed: close it at shutdown).",
            Target(
                findings(
                    ["client_session_per_request", "client_session_unclosed"],
                    selector=SEL,
                ),
                "{{kind}} on {{http_route}}",
            ),
            unit="opm",
            steps=ANY_IS_BAD,
            width=24,
        ),
    ]
    return Dashboard(
        "asyncsentinel-http-client",
        "asyncsentinel / HTTP client",
        "Outgoing aiohttp requests: latency and failures by host, connector queueing, "
        "connection reuse, DNS cache and ClientSession findings.",
        ("host",),
        panels,
    )


DASHBOARDS = (overview, database_pools, event_loop, http_client)


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard, exactly as committed."""
    rendered = {}
    for build in DASHBOARDS:
        dashboard = build()
        rendered[dashboard.filename] = json.dumps(dashboard.render(), indent=2) + "\n"
    return rendered


def stale_files(directory: Path = OUTPUT_DIR) -> list[str]:
    """Names of dashboard files in *directory* that are missing or differ from the generator."""
    stale = []
    for name, text in render_all().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or ``--check``) the dashboards."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON is stale")
    parser.add_argument("--out", type=Path, default=OUTPUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for name in stale:
            print(f"stale: {args.out / name} (run: python dashboards/generate.py)", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
