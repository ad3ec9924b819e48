"""The Grafana dashboards, the Prometheus alert rules and the docker-compose example.

What a user relies on: the dashboards import into Grafana 10/11 as they are (a Prometheus
``datasource`` variable, no hard-coded data source uid, units, descriptions), every query they
and the alert rules run names a metric and labels that asyncsentinel really exports (checked
against the instrument catalogue; ``tests/e2e/test_prometheus_alerting.py`` checks them against
a real scrape), every alert has unit tests in which it fires and stays silent, and the
docker-compose example mounts files that exist.

``promtool`` and ``amtool`` come from the Debian packages ``prometheus`` and
``prometheus-alertmanager``. Without them these checks skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from asyncsentinel.findings import ALL_KINDS
from asyncsentinel.instruments import ALL_INSTRUMENTS

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "dashboards"
GRAFANA_DIR = DASHBOARDS / "grafana"
ALERTS = DASHBOARDS / "prometheus" / "alerts.yml"
ALERT_TESTS = DASHBOARDS / "prometheus" / "alerts.test.yml"
PROVISIONING = DASHBOARDS / "provisioning"
EXAMPLES = REPO / "examples"
COMPOSE = EXAMPLES / "docker-compose.yml"

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
TARGET_LABELS = frozenset({"job", "instance"})
# Series Prometheus itself makes: scrape health and alert state.
SYNTHETIC_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})
# Label values the sources emit for enumerated labels (documented in the catalogue's help).
ENUMERATED_VALUES: dict[str, frozenset[str]] = {
    "kind": ALL_KINDS,
    "db_client_connection_state": frozenset({"idle", "used"}),
    "state": frozenset({"created", "reused"}),
    "result": frozenset({"hit", "miss"}),
}
SATURATION_STEPS = [("green", None), ("orange", 0.8), ("red", 0.95)]


# --- tools ----------------------------------------------------------------------------------------
def require_binary(name: str, package: str) -> str:
    """The path of *name*; skip locally when it is missing, fail under ``CI=true``."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed: apt-get install {package} (as root, after apt-get update)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {message}")
    pytest.skip(message)


def run_tool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command line tool; the result carries its output for assertion messages."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


# --- the catalogue --------------------------------------------------------------------------------
@cache
def catalogue_series() -> dict[str, frozenset[str]]:
    """Every series name asyncsentinel exports -> the label names it can carry."""
    series: dict[str, frozenset[str]] = {}
    for instrument in ALL_INSTRUMENTS:
        labels = frozenset(instrument.labels) | TARGET_LABELS
        if instrument.kind == "histogram":
            series[f"{instrument.name}_bucket"] = labels | {"le"}
            series[f"{instrument.name}_sum"] = labels
            series[f"{instrument.name}_count"] = labels
        else:
            series[instrument.name] = labels
    return series


# --- PromQL, just enough to find metric names, selectors and grouping labels ----------------------
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2"})
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}")


def grafana_variables(expr: str) -> set[str]:
    """Names of the Grafana variables an expression uses (``$job``, ``${pool}``)."""
    return {a or b for a, b in _VARIABLE.findall(expr) if not (a or b).startswith("__")}


def substitute(expr: str) -> str:
    """The PromQL Grafana sends with every variable at its "All" value."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
    expr = expr.replace("$__interval", "15s")
    return _VARIABLE.sub(".*", expr)


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (functions and keywords excluded)."""
    text = _STRING.sub('""', expr)
    names = {m.group(1) for m in _SELECTOR.finditer(text) if m.group(1)}
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if not call and name not in _KEYWORDS:
            names.add(name)
    return names


def selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, operator, value)]) of each ``metric{...}`` in the expression."""
    for match in _SELECTOR.finditer(expr):
        yield match.group(1) or "", _MATCHER.findall(match.group(2))


def grouping_labels(expr: str) -> set[str]:
    """Labels named in ``by``/``without``/``on``/``ignoring``/``group_*`` clauses."""
    labels: set[str] = set()
    for _, names in _GROUPING.findall(_STRING.sub('""', expr)):
        labels.update(n.strip() for n in names.split(",") if n.strip())
    return labels


# --- dashboards and rules -------------------------------------------------------------------------
@cache
def load_dashboards() -> dict[str, dict[str, Any]]:
    """File name -> parsed dashboard JSON."""
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(GRAFANA_DIR.glob("*.json"))
    }


def content_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (rows excluded, panels inside collapsed rows included)."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title + refId, PromQL) of every panel target and query annotation."""
    queries = [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in content_panels(dashboard)
        for target in panel["targets"]
    ]
    queries += [
        (f"annotation {a['name']}", a["expr"])
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    ]
    return queries


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable name, metric selector, label) of each ``label_values(selector, label)``."""
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else ""
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query or variable["definition"])
        assert match, f"variable {variable['name']}: not a label_values() query: {query!r}"
        found.append((variable["name"], match.group(1), match.group(2)))
    return found


@cache
def load_rules() -> list[dict[str, Any]]:
    """Every recording and alerting rule of alerts.yml."""
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def recorded_series() -> dict[str, frozenset[str]]:
    """Recording rule name -> label names it can carry (those of the series it reads)."""
    series = catalogue_series()
    recorded: dict[str, frozenset[str]] = {}
    for rule in load_rules():
        if "record" in rule:
            sources = metric_names(rule["expr"]) - SYNTHETIC_SERIES
            recorded[rule["record"]] = frozenset().union(*(series[n] for n in sources))
    return recorded


def known_series() -> dict[str, frozenset[str]]:
    return {**catalogue_series(), **recorded_series()}


def all_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard panel and annotation and every rule."""
    queries = [
        (f"{name}: {where}", expr)
        for name, dashboard in load_dashboards().items()
        for where, expr in panel_queries(dashboard)
    ]
    queries += [(f"alerts.yml: {r.get('alert') or r['record']}", r["expr"]) for r in load_rules()]
    return queries


def used_catalogue_series() -> set[str]:
    """Catalogue series names any dashboard or rule uses (what a real scrape must contain)."""
    used: set[str] = set()
    for _, expr in all_queries():
        used |= metric_names(expr)
    for dashboard in load_dashboards().values():
        for _, selector, _ in variable_queries(dashboard):
            used |= metric_names(selector)
    return used & set(catalogue_series())


@cache
def generator() -> ModuleType:
    """dashboards/generate.py, imported from its path."""
    spec = importlib.util.spec_from_file_location(
        "asyncsentinel_dashboards", DASHBOARDS / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


# --- generated JSON -------------------------------------------------------------------------------
def test_committed_dashboards_are_what_the_generator_produces() -> None:
    assert generator().stale_files() == [], (
        "dashboards/grafana/*.json is stale: run `python dashboards/generate.py` and commit"
    )
    assert set(load_dashboards()) == set(generator().render_all())


def test_the_four_dashboards_exist() -> None:
    titles = {d["title"] for d in load_dashboards().values()}
    assert titles == {
        "asyncsentinel / Overview",
        "asyncsentinel / Database pools",
        "asyncsentinel / Event loop & tasks",
        "asyncsentinel / HTTP client",
    }


# --- dashboard structure (Grafana 10/11 import as-is) ---------------------------------------------
def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


@pytest.mark.parametrize("name", sorted(load_dashboards()))
def test_dashboard_uses_the_datasource_variable_and_no_hard_coded_uid(name: str) -> None:
    dashboard = load_dashboards()[name]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "__inputs" not in dashboard, "export-for-sharing inputs would force an import dialog"
    for node in _walk(dashboard):
        datasource = node.get("datasource")
        if isinstance(datasource, dict):
            if datasource.get("type") == "grafana":  # the built-in annotations source
                assert datasource["uid"] == "-- Grafana --"
            else:
                assert datasource == DATASOURCE_REF, f"{name}: hard-coded data source {datasource}"
        elif datasource is not None:
            assert datasource == "${datasource}", f"{name}: data source {datasource!r}"


@pytest.mark.parametrize("name", sorted(load_dashboards()))
def test_dashboard_variables(name: str) -> None:
    dashboard = load_dashboards()[name]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= set(variables)
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE_REF
            assert variable["multi"] and variable["includeAll"]
            assert variable["allValue"] == ".*"
    used: set[str] = set()
    for where, expr in panel_queries(dashboard):
        used |= grafana_variables(expr)
        # Multi-value variables expand to a regex alternation: only =~ / !~ can take them.
        for _, matchers in selectors(expr):
            for label, operator, value in matchers:
                if "$" in value:
                    assert operator in ("=~", "!~"), f"{name} {where}: {label}{operator}{value}"
    for _, selector, _ in variable_queries(dashboard):
        used |= grafana_variables(selector)
    assert used <= set(variables), f"{name}: undefined variables {used - set(variables)}"
    assert set(variables) - {"datasource"} <= used, f"{name}: unused variables"


@pytest.mark.parametrize("name", sorted(load_dashboards()))
def test_dashboard_panels_have_units_descriptions_and_a_sane_layout(name: str) -> None:
    dashboard = load_dashboards()[name]
    assert dashboard["uid"].startswith("asyncsentinel-") and len(dashboard["uid"]) <= 40
    assert dashboard["id"] is None
    assert 36 <= dashboard["schemaVersion"] <= 41  # Grafana 10.0 .. 11.x
    assert "asyncsentinel" in dashboard["tags"]
    ids = [p["id"] for p in _walk(dashboard["panels"]) if "gridPos" in p]
    assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']}"
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{name}: {panel['title']} overlaps another panel"
        cells |= area
    for panel in content_panels(dashboard):
        title = panel["title"]
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}
        assert len(panel.get("description", "")) >= 40, f"{name}: {title} has no description"
        assert panel["fieldConfig"]["defaults"]["unit"], f"{name}: {title} has no unit"
        assert panel["targets"], f"{name}: {title} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[0]["value"] is None
        values = [s["value"] for s in steps[1:]]
        assert values == sorted(values), f"{name}: {title} thresholds out of order"
        if "saturation" in title.lower() or "pool busy" in title.lower():
            assert [(s["color"], s["value"]) for s in steps] == SATURATION_STEPS, title
            assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"


# --- metric names and labels against the catalogue ------------------------------------------------
def test_every_query_uses_only_exported_metrics() -> None:
    known = set(known_series()) | SYNTHETIC_SERIES
    unknown = {
        (where, name)
        for where, expr in all_queries()
        for name in metric_names(expr)
        if name not in known
    }
    for dashboard in load_dashboards().values():
        for variable, selector, _ in variable_queries(dashboard):
            unknown |= {(f"variable {variable}", n) for n in metric_names(selector) - known}
    assert not unknown, f"metrics not in src/asyncsentinel/instruments.py: {sorted(unknown)}"


def test_metric_name_extraction_sees_through_promql() -> None:
    # The checks above are only as good as this parser: it must find every series name.
    expr = (
        'sum by (le, http_route) (rate(a_bucket{job=~"$job", kind=~"x|y"}[5m])) / on (job) '
        "group_left (instance) b_total offset 5m or vector(0) and c:d:e > bool 1e3"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c:d:e"}
    assert grouping_labels(expr) == {"le", "http_route", "job", "instance"}
    assert list(selectors(expr)) == [("a_bucket", [("job", "=~", "$job"), ("kind", "=~", "x|y")])]


def test_every_label_in_a_query_exists_on_its_metric() -> None:
    series = known_series()
    problems = []
    for where, expr in all_queries():
        names = metric_names(expr) - SYNTHETIC_SERIES
        available = frozenset().union(*(series[n] for n in names if n in series)) | TARGET_LABELS
        for metric, matchers in selectors(expr):
            if metric in SYNTHETIC_SERIES:
                continue
            allowed = series.get(metric, available)
            for label, operator, value in matchers:
                if label not in allowed:
                    problems.append(f"{where}: {metric} has no label {label}")
                if label in ENUMERATED_VALUES and "$" not in value and operator in ("=", "=~"):
                    for alternative in value.split("|"):
                        if alternative not in ENUMERATED_VALUES[label]:
                            problems.append(f"{where}: {label}={alternative!r} is never emitted")
        for label in grouping_labels(expr) - available - {"le"}:
            problems.append(f"{where}: groups by {label}, which none of {sorted(names)} has")
    for dashboard in load_dashboards().values():
        for variable, selector, label in variable_queries(dashboard):
            for name in metric_names(selector):
                if label not in series[name]:
                    problems.append(f"variable {variable}: {name} has no label {label}")
    assert not problems, "\n".join(problems)


def test_every_instrument_and_finding_kind_is_on_a_dashboard() -> None:
    panel_exprs = [expr for d in load_dashboards().values() for _, expr in panel_queries(d)]
    used = set().union(*(metric_names(e) for e in panel_exprs))
    for instrument in ALL_INSTRUMENTS:
        variants = {
            instrument.name,
            *(f"{instrument.name}_{s}" for s in ("bucket", "sum", "count")),
        }
        assert variants & used, f"{instrument.name} is on no dashboard panel"
    text = "\n".join(panel_exprs)
    missing = {kind for kind in ALL_KINDS if not re.search(rf"\b{kind}\b", text)}
    assert not missing, f"finding kinds without a dashboard panel: {sorted(missing)}"


# --- alert rules ----------------------------------------------------------------------------------
EXPECTED_ALERTS = {
    "AsyncSentinelDBPoolExhausted",
    "AsyncSentinelDBPoolSaturated",
    "AsyncSentinelDBPoolWaitersQueueing",
    "AsyncSentinelEventLoopBlockedRepeatedly",
    "AsyncSentinelEventLoopLagHigh",
    "AsyncSentinelNPlusOneSurge",
    "AsyncSentinelDBConnectionLeaked",
    "AsyncSentinelInstrumentationErrors",
}


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_alert_rules_carry_severity_summary_description_and_runbook() -> None:
    alerts = [r for r in load_rules() if "alert" in r]
    assert {a["alert"] for a in alerts} == EXPECTED_ALERTS
    readme = (DASHBOARDS / "README.md").read_text(encoding="utf-8")
    anchors = {_github_anchor(h) for h in re.findall(r"^#+\s+(.+)$", readme, re.MULTILINE)}
    series = known_series()
    for alert in alerts:
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook", "runbook_url"} <= set(annotations), name
        anchor = annotations["runbook_url"].rpartition("#")[2]
        assert anchor in anchors, f"{name}: runbook_url anchor #{anchor} not in dashboards/README"
        labels = frozenset().union(*(series[n] for n in metric_names(alert["expr"]) if n in series))
        for label in ("db_client_connection_pool_name", "http_route", "component"):
            if label in labels:
                assert f"$labels.{label}" in annotations["description"], f"{name}: {label}"
                assert f"$labels.{label}" in annotations["summary"], f"{name}: {label}"


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    document = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    assert document["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for test in document["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
    assert fires == EXPECTED_ALERTS, f"alerts never shown firing: {EXPECTED_ALERTS - fires}"
    assert silent == EXPECTED_ALERTS, f"alerts never shown silent: {EXPECTED_ALERTS - silent}"


def test_promtool_check_rules() -> None:
    promtool = require_binary("promtool", "prometheus")
    result = run_tool(promtool, "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    promtool = require_binary("promtool", "prometheus")
    result = run_tool(promtool, "test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # promtool has no "parse this expression" command; as recording rules it parses them all.
    promtool = require_binary("promtool", "prometheus")
    queries = [
        (f"{name}: {where}", substitute(expr))
        for name, dashboard in load_dashboards().items()
        for where, expr in panel_queries(dashboard)
    ]
    rules = [
        {"record": f"asyncsentinel:panel_query:{i}", "expr": e} for i, (_, e) in enumerate(queries)
    ]
    path = tmp_path / "panel_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = run_tool(promtool, "check", "rules", path)
    assert result.returncode == 0, (
        result.stdout
        + result.stderr
        + "\n"
        + "\n".join(f"{i}: {where}" for i, (where, _) in enumerate(queries))
    )
    assert f"{len(rules)} rules found" in result.stdout


# --- provisioning and the docker-compose example --------------------------------------------------
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of each bind mount (short syntax, relative to examples/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith((".", "/")), f"named volume {source!r}: bind mounts only"
        mounts[target] = (EXAMPLES / source).resolve()
    return mounts


def test_docker_compose_mounts_files_that_exist() -> None:
    services = _compose()["services"]
    assert {"app", "prometheus", "alertmanager", "grafana"} <= set(services)
    for name, service in services.items():
        for target, source in _mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
        build = service.get("build")
        if build is not None:
            context = (EXAMPLES / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: Dockerfile missing"
            for line in (context / build["dockerfile"]).read_text().splitlines():
                if line.startswith("COPY "):
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), f"{name}: COPY {source} missing"
    # Prometheus loads the real alert rules, Grafana the real dashboards and provisioning.
    prometheus = _mounts(services["prometheus"])
    config = yaml.safe_load(prometheus["/etc/prometheus/prometheus.yml"].read_text())
    for rule_file in config["rule_files"]:
        assert prometheus[rule_file] == ALERTS.resolve()
    grafana = _mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == PROVISIONING.resolve()
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "asyncsentinel.yml").read_text())
    assert grafana[provider["providers"][0]["options"]["path"]] == GRAFANA_DIR.resolve()
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "asyncsentinel.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert "PROMETHEUS_URL" in services["grafana"]["environment"]
    assert "--cluster.listen-address=" in services["alertmanager"]["command"]


def test_docker_compose_app_command_is_a_valid_asyncsentinel_command_line() -> None:
    from asyncsentinel.cli import build_parser

    command = _compose()["services"]["app"]["command"]
    assert command[0] == "asyncsentinel"
    args = build_parser().parse_args(command[1:])  # exits (fails the test) on a wrong option
    assert args.command == "demo" and args.serve and args.host == "0.0.0.0"


def test_example_prometheus_and_alertmanager_configs_are_valid() -> None:
    promtool = require_binary("promtool", "prometheus")
    amtool = require_binary("amtool", "prometheus-alertmanager")
    # --syntax-only: the rule file path is the one inside the container (checked above).
    result = run_tool(promtool, "check", "config", "--syntax-only", EXAMPLES / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    result = run_tool(amtool, "check-config", EXAMPLES / "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
