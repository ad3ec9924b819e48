"""SQLAlchemy findings through in-process apps (httpx ASGITransport: a server adds nothing here)
on real PostgreSQL and SQLite: slow_query, sync_db_on_event_loop, engine_created_in_request,
connection_leaked, pool_not_disposed and the pool_pre_ping advice, each with a healthy twin."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from asyncsentinel import (
    CONNECTION_LEAKED,
    DB_CONFIGURATION_ADVICE,
    ENGINE_CREATED_IN_REQUEST,
    POOL_NOT_DISPOSED,
    SLOW_QUERY,
    SYNC_DB_ON_EVENT_LOOP,
    Severity,
)
from tests.sources.dbapps import (
    async_wait_until,
    dispose_at_shutdown,
    events_named,
    instrument_app,
    line_of,
    log_lines,
    pg_url,
    running,
)
from tests.support import sample

__all__ = ["pg_url"]

HERE = __file__


def findings_total(registry: object, kind: str, route: str) -> float:
    return sample(registry, "asyncsentinel_findings_total", kind=kind, http_route=route)  # type: ignore[arg-type]


def assert_reported(sentinel, registry, spans, caplog, kind: str, route: str, line: int) -> None:
    """The finding is in the metric, on the request span and in a log line naming file:line."""
    assert findings_total(registry, kind, route) == 1
    (finding,) = sentinel.findings(kind)
    assert finding.culprit is not None
    assert (finding.culprit.filename, finding.culprit.lineno) == (HERE, line)
    (span, event), *_ = events_named(spans, f"asyncsentinel.{kind}")
    assert span.name == f"GET {route}"
    assert (event.attributes["code.file.path"], event.attributes["code.line.number"]) == (
        HERE,
        line,
    )
    assert any(f"on GET {route} at {HERE}:{line}" in m for m in log_lines(caplog, kind))


def assert_not_reported(sentinel, registry, spans, caplog, kind: str, route: str) -> None:
    assert findings_total(registry, kind, route) == 0
    assert sentinel.findings(kind) == []
    assert list(events_named(spans, f"asyncsentinel.{kind}")) == []
    assert log_lines(caplog, kind) == []


# --- slow_query -----------------------------------------------------------------------------------
async def test_slow_query_reports_the_statement_shape_and_line(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    engine = create_async_engine(pg_url, pool_pre_ping=True)
    app = FastAPI(lifespan=dispose_at_shutdown(engine))

    @app.get("/report")
    async def report(seconds: float = 0.4) -> dict[str, float]:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})  # slow statement
        return {"slept": seconds}

    sentinel = instrument_app(app, registry, tracer_provider, slow_query_seconds=0.1)
    try:
        async with running(app) as client:
            assert (await client.get("/report")).status_code == 200
        assert_reported(
            sentinel,
            registry,
            spans,
            finding_logs,
            SLOW_QUERY,
            "/report",
            line_of(HERE, "# slow statement"),
        )
        (finding,) = sentinel.findings(SLOW_QUERY)
        assert finding.evidence["statement"] == "SELECT pg_sleep(?)"
        assert finding.evidence["duration_seconds"] >= 0.1
        assert (
            sample(
                registry,
                "db_client_operation_duration_seconds_count",
                db_system_name="postgresql",
                db_operation_name="SELECT",
                db_client_connection_pool_name=sentinel.instrument_engine(engine),
            )
            >= 1
        )
    finally:
        sentinel.close()


async def test_fast_query_healthy_twin_is_not_slow(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    engine = create_async_engine(pg_url, pool_pre_ping=True)
    app = FastAPI(lifespan=dispose_at_shutdown(engine))

    @app.get("/report")
    async def report() -> dict[str, int]:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(0)"))
        return {"slept": 0}

    sentinel = instrument_app(app, registry, tracer_provider, slow_query_seconds=0.25)
    try:
        async with running(app) as client:
            assert (await client.get("/report")).status_code == 200
        assert_not_reported(sentinel, registry, spans, finding_logs, SLOW_QUERY, "/report")
    finally:
        sentinel.close()


# --- sync_db_on_event_loop ------------------------------------------------------------------------
def _sqlite_app(tmp_path: Path) -> FastAPI:
    sync_engine = create_engine(f"sqlite:///{tmp_path / 'sync.db'}")
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
    app = FastAPI(lifespan=dispose_at_shutdown(async_engine))
    app.state.sync_engine = sync_engine

    def count_tables() -> int:
        with sync_engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM sqlite_master")).scalar_one())

    @app.get("/sync-in-async")
    async def sync_in_async() -> dict[str, int]:
        with sync_engine.connect() as conn:
            tables = conn.execute(text("SELECT count(*) FROM sqlite_master")).scalar_one()  # blocks
        return {"tables": int(tables)}

    @app.get("/to-thread")
    async def to_thread() -> dict[str, int]:
        return {"tables": await asyncio.to_thread(count_tables)}

    @app.get("/sync-route")
    def sync_route() -> dict[str, int]:  # FastAPI runs def routes in its thread pool
        return {"tables": count_tables()}

    @app.get("/aiosqlite")
    async def with_aiosqlite() -> dict[str, int]:
        async with async_engine.connect() as conn:
            tables = (await conn.execute(text("SELECT count(*) FROM sqlite_master"))).scalar_one()
        return {"tables": int(tables)}

    return app


async def test_sync_engine_on_the_event_loop_is_reported(
    tmp_path, registry, tracer_provider, spans, finding_logs
):
    app = _sqlite_app(tmp_path)
    sentinel = instrument_app(app, registry, tracer_provider)
    try:
        async with running(app) as client:
            assert (await client.get("/sync-in-async")).status_code == 200
        assert_reported(
            sentinel,
            registry,
            spans,
            finding_logs,
            SYNC_DB_ON_EVENT_LOOP,
            "/sync-in-async",
            line_of(HERE, "# blocks"),
        )
        (finding,) = sentinel.findings(SYNC_DB_ON_EVENT_LOOP)
        assert finding.evidence["driver"] == "pysqlite"
        assert finding.evidence["db_system_name"] == "sqlite"
    finally:
        app.state.sync_engine.dispose()
        sentinel.close()


@pytest.mark.parametrize("route", ["/to-thread", "/sync-route", "/aiosqlite"])
async def test_sync_engine_off_the_loop_and_async_engines_are_healthy(
    route, tmp_path, registry, tracer_provider, spans, finding_logs
):
    app = _sqlite_app(tmp_path)
    sentinel = instrument_app(app, registry, tracer_provider)
    try:
        async with running(app) as client:
            assert (await client.get(route)).status_code == 200
        assert sample(registry, "asyncsentinel_request_db_queries_sum", http_route=route) == 1
        assert_not_reported(sentinel, registry, spans, finding_logs, SYNC_DB_ON_EVENT_LOOP, route)
    finally:
        app.state.sync_engine.dispose()
        sentinel.close()


# --- engine_created_in_request --------------------------------------------------------------------
def _engine_app(url: str) -> FastAPI:
    shared = create_async_engine(url, pool_pre_ping=True)
    app = FastAPI(lifespan=dispose_at_shutdown(shared))

    @app.get("/per-request")
    async def per_request() -> dict[str, int]:
        engine = create_async_engine(url, pool_pre_ping=True)  # engine per request
        try:
            async with engine.connect() as conn:
                return {"one": (await conn.execute(text("SELECT 1"))).scalar_one()}
        finally:
            await engine.dispose()

    @app.get("/shared")
    async def with_shared_engine() -> dict[str, int]:
        async with shared.connect() as conn:
            return {"one": (await conn.execute(text("SELECT 1"))).scalar_one()}

    return app


async def test_engine_created_in_a_request_is_reported(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    app = _engine_app(pg_url)
    sentinel = instrument_app(app, registry, tracer_provider)
    try:
        async with running(app) as client:
            assert (await client.get("/per-request")).status_code == 200
        assert_reported(
            sentinel,
            registry,
            spans,
            finding_logs,
            ENGINE_CREATED_IN_REQUEST,
            "/per-request",
            line_of(HERE, "# engine per request"),
        )
    finally:
        sentinel.close()


async def test_engine_created_at_startup_is_healthy(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    app = _engine_app(pg_url)
    sentinel = instrument_app(app, registry, tracer_provider)
    try:
        async with running(app) as client:
            assert (await client.get("/shared")).status_code == 200
        assert_not_reported(
            sentinel, registry, spans, finding_logs, ENGINE_CREATED_IN_REQUEST, "/shared"
        )
    finally:
        sentinel.close()


# --- connection_leaked ----------------------------------------------------------------------------
def _leaky_app(url: str) -> tuple[FastAPI, list[AsyncConnection]]:
    engine = create_async_engine(url, pool_pre_ping=True)
    app = FastAPI(lifespan=dispose_at_shutdown(engine))
    kept: list[AsyncConnection] = []

    @app.get("/kept")
    async def kept_open() -> dict[str, int]:
        conn = await engine.connect()  # never closed
        kept.append(conn)
        return {"one": (await conn.execute(text("SELECT 1"))).scalar_one()}

    @app.get("/forgotten")
    async def forgotten() -> dict[str, int]:
        conn = await engine.connect()  # dropped without close
        return {"one": (await conn.execute(text("SELECT 1"))).scalar_one()}

    @app.get("/closed")
    async def closed() -> dict[str, int]:
        async with engine.connect() as conn:
            return {"one": (await conn.execute(text("SELECT 1"))).scalar_one()}

    return app, kept


async def test_connection_still_checked_out_after_the_request_is_leaked(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    app, kept = _leaky_app(pg_url)
    sentinel = instrument_app(app, registry, tracer_provider, connection_leak_seconds=0.2)
    line = line_of(HERE, "# never closed")
    try:
        async with running(app) as client:
            assert (await client.get("/kept")).status_code == 200
            await async_wait_until(
                lambda: findings_total(registry, CONNECTION_LEAKED, "/kept") == 1
            )
            (finding,) = sentinel.findings(CONNECTION_LEAKED)
            assert finding.culprit is not None
            assert (finding.culprit.filename, finding.culprit.lineno) == (HERE, line)
            assert finding.evidence["garbage_collected"] is False
            assert finding.evidence["held_seconds"] >= 0.2
            # The request span had ended: the event is on a finding span linked to it.
            (span, event), *_ = events_named(spans, "asyncsentinel.connection_leaked")
            assert event.attributes["code.line.number"] == line
            assert span.links and event.attributes["http.route"] == "/kept"
            assert any(
                f"on GET /kept at {HERE}:{line}" in m
                for m in log_lines(finding_logs, CONNECTION_LEAKED)
            )
            await kept.pop().close()
    finally:
        sentinel.close()


async def test_connection_garbage_collected_while_checked_out_is_leaked(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    app, _ = _leaky_app(pg_url)
    sentinel = instrument_app(app, registry, tracer_provider, connection_leak_seconds=30)
    try:
        async with running(app) as client:
            # SQLAlchemy terminates such a connection and warns about it; we report the line.
            with pytest.warns(sa_exc.SAWarning, match="garbage collector"):  # noqa: PT031 - gc may run in the request or after
                assert (await client.get("/forgotten")).status_code == 200
                gc.collect()
            (finding,) = sentinel.findings(CONNECTION_LEAKED)
            assert finding.evidence["garbage_collected"] is True
            assert finding.evidence["object"] == "connection"
            assert finding.culprit is not None
            assert finding.culprit.lineno == line_of(HERE, "# dropped without close")
            assert findings_total(registry, CONNECTION_LEAKED, "/forgotten") == 1
            assert len(list(events_named(spans, "asyncsentinel.connection_leaked"))) == 1
    finally:
        sentinel.close()


async def test_connection_closed_in_the_request_is_healthy(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    app, _ = _leaky_app(pg_url)
    sentinel = instrument_app(app, registry, tracer_provider, connection_leak_seconds=0.1)
    try:
        async with running(app) as client:
            assert (await client.get("/closed")).status_code == 200
            await asyncio.sleep(0.4)  # well past connection_leak_seconds
            gc.collect()
        assert_not_reported(sentinel, registry, spans, finding_logs, CONNECTION_LEAKED, "/closed")
    finally:
        sentinel.close()


# --- pool_not_disposed ----------------------------------------------------------------------------
async def test_engine_not_disposed_at_shutdown_is_reported(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = create_async_engine(pg_url, pool_pre_ping=True)  # never disposed
        yield  # ... and no dispose() here

    app = FastAPI(lifespan=lifespan)

    @app.get("/one")
    async def one() -> dict[str, int]:
        async with app.state.engine.connect() as conn:
            return {"one": (await conn.execute(text("SELECT 1"))).scalar_one()}

    sentinel = instrument_app(app, registry, tracer_provider)
    line = line_of(HERE, "# never disposed")
    try:
        async with running(app) as client:
            assert (await client.get("/one")).status_code == 200
            assert sentinel.findings(POOL_NOT_DISPOSED) == []
        # The shutdown check ran when the lifespan ended.
        (finding,) = sentinel.findings(POOL_NOT_DISPOSED)
        assert finding.culprit is not None
        assert (finding.culprit.filename, finding.culprit.lineno) == (HERE, line)
        assert finding.evidence["idle"] == 1 and finding.evidence["used"] == 0
        assert findings_total(registry, POOL_NOT_DISPOSED, "") == 1
        (_, event), *_ = events_named(spans, "asyncsentinel.pool_not_disposed")
        assert event.attributes["code.line.number"] == line
        assert any(
            f"outside a request at {HERE}:{line}" in m
            for m in log_lines(finding_logs, POOL_NOT_DISPOSED)
        )
    finally:
        await app.state.engine.dispose()
        sentinel.close()


async def test_engine_created_before_instrumenting_is_still_checked_at_shutdown(
    pg_url, registry, tracer_provider, finding_logs
):
    engine = create_async_engine(pg_url, pool_pre_ping=True)  # before the Sentinel exists
    app = FastAPI()

    @app.get("/one")
    async def one() -> dict[str, int]:
        async with engine.connect() as conn:
            return {"one": (await conn.execute(text("SELECT 1"))).scalar_one()}

    sentinel = instrument_app(app, registry, tracer_provider, engines=[engine])
    try:
        async with running(app) as client:
            assert (await client.get("/one")).status_code == 200
        (finding,) = sentinel.findings(POOL_NOT_DISPOSED)
        # Where it was created is unknown (asyncsentinel was not there yet); the pool name says
        # which engine it is.
        assert finding.culprit is None
        assert finding.evidence["pool"] == sentinel.instrument_engine(engine)
        assert finding.evidence["pool"] in log_lines(finding_logs, POOL_NOT_DISPOSED)[0]
    finally:
        await engine.dispose()
        sentinel.close()


async def test_engine_disposed_in_the_lifespan_is_healthy(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    engine = create_async_engine(pg_url, pool_pre_ping=True)
    app = FastAPI(lifespan=dispose_at_shutdown(engine))

    @app.get("/one")
    async def one() -> dict[str, int]:
        async with engine.connect() as conn:
            return {"one": (await conn.execute(text("SELECT 1"))).scalar_one()}

    sentinel = instrument_app(app, registry, tracer_provider)
    try:
        async with running(app) as client:
            assert (await client.get("/one")).status_code == 200
        assert_not_reported(sentinel, registry, spans, finding_logs, POOL_NOT_DISPOSED, "")
    finally:
        sentinel.close()


# --- pool_pre_ping advice -------------------------------------------------------------------------
def _app_creating_engine(url: str, **options: object) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        app.state.engine = create_async_engine(url, **options)  # engine options
        yield
        await app.state.engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/one")
    async def one() -> dict[str, int]:
        async with app.state.engine.connect() as conn:
            return {"one": (await conn.execute(text("SELECT 1"))).scalar_one()}

    return app


async def test_pool_pre_ping_off_gets_advice_once(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    app = _app_creating_engine(pg_url)
    sentinel = instrument_app(app, registry, tracer_provider)
    line = line_of(HERE, "# engine options")
    try:
        async with running(app) as client:
            for _ in range(3):
                assert (await client.get("/one")).status_code == 200
        (advice,) = sentinel.findings(DB_CONFIGURATION_ADVICE)
        assert advice.severity is Severity.INFO
        assert advice.evidence["setting"] == "pool_pre_ping"
        assert advice.culprit is not None and advice.culprit.lineno == line
        assert findings_total(registry, DB_CONFIGURATION_ADVICE, "") == 1
        (record,) = [
            r
            for r in finding_logs.records
            if r.getMessage().startswith("asyncsentinel db_configuration_advice")
        ]
        assert record.levelname == "INFO" and f"{HERE}:{line}" in record.getMessage()
        assert len(list(events_named(spans, "asyncsentinel.db_configuration_advice"))) == 1
    finally:
        sentinel.close()


async def test_pool_pre_ping_on_gets_no_advice(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    app = _app_creating_engine(pg_url, pool_pre_ping=True)
    sentinel = instrument_app(app, registry, tracer_provider)
    try:
        async with running(app) as client:
            assert (await client.get("/one")).status_code == 200
        pre_ping = [
            f
            for f in sentinel.findings(DB_CONFIGURATION_ADVICE)
            if f.evidence.get("setting") == "pool_pre_ping"
        ]
        assert pre_ping == []
    finally:
        sentinel.close()


# --- nothing secret leaves the process ------------------------------------------------------------
async def test_literals_and_bind_values_appear_in_no_output(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    engine = create_async_engine(pg_url)
    app = FastAPI(lifespan=dispose_at_shutdown(engine))
    # Values live on lines of their own: stacks in findings show the source lines they pass
    # through, and those are the application's code, not data.
    statement = text("SELECT 's3cr3t-literal' AS a, CAST(:p AS text) AS b, 42424242 AS c")
    params = {"p": "bind-s3cr3t-value"}

    @app.get("/secret")
    async def secret() -> dict[str, str]:
        async with engine.connect() as conn:
            for _ in range(6):  # N+1, and every statement slow: every finding path runs
                row = (await conn.execute(statement, params)).one()
        return {"ok": str(row.b == params["p"])}

    sentinel = instrument_app(
        app, registry, tracer_provider, slow_query_seconds=1e-6, connection_leak_seconds=0.05
    )
    try:
        async with running(app) as client:
            assert (await client.get("/secret")).json() == {"ok": "True"}
        kinds = {f.kind for f in sentinel.findings()}
        assert {"n_plus_one", "slow_query"} <= kinds
        outputs = [sentinel.render_metrics()[0].decode()]
        for span in spans.get_finished_spans():
            outputs.append(span.name)
            outputs.append(json.dumps(dict(span.attributes or {}), default=str))
            outputs.extend(json.dumps(dict(e.attributes or {}), default=str) for e in span.events)
        for record in finding_logs.records:
            outputs.append(record.getMessage())
            outputs.append(json.dumps(getattr(record, "asyncsentinel", {}), default=str))
        outputs.extend(json.dumps(f.as_dict(), default=str) for f in sentinel.findings())
        everything = "\n".join(outputs)
        assert "SELECT ? AS a, CAST(? AS text) AS b, ? AS c" in everything
        for secret in ("s3cr3t", "42424242"):
            assert secret not in everything
    finally:
        sentinel.close()
