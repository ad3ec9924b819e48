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
from tests.sources.dbapps import Outputs, add_select_one, culprit_of, dispose_at_shutdown, running
from tests.support import line_of

HERE = __file__


# --- slow_query -----------------------------------------------------------------------------------
async def test_slow_query_reports_the_statement_shape_and_line(pg_url, outputs: Outputs):
    engine = create_async_engine(pg_url, pool_pre_ping=True)
    app = FastAPI(lifespan=dispose_at_shutdown(engine))

    @app.get("/report")
    async def report(seconds: float = 0.4) -> dict[str, float]:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})  # slow statement
        return {"slept": seconds}

    sentinel = outputs.instrument(app, slow_query_seconds=0.1)
    async with running(app) as client:
        assert (await client.get("/report")).status_code == 200
    culprit = (HERE, line_of(HERE, "# slow statement"))
    finding = outputs.assert_reported(sentinel, SLOW_QUERY, "/report", culprit)
    assert finding.evidence["statement"] == "SELECT pg_sleep(?)"
    assert finding.evidence["duration_seconds"] >= 0.1
    assert (
        outputs.sample(
            "db_client_operation_duration_seconds_count",
            db_system_name="postgresql",
            db_operation_name="SELECT",
            db_client_connection_pool_name=sentinel.instrument_engine(engine),
        )
        >= 1
    )


async def test_fast_query_healthy_twin_is_not_slow(pg_url, outputs: Outputs):
    engine = create_async_engine(pg_url, pool_pre_ping=True)
    app = FastAPI(lifespan=dispose_at_shutdown(engine))

    @app.get("/report")
    async def report() -> dict[str, int]:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(0)"))
        return {"slept": 0}

    sentinel = outputs.instrument(app, slow_query_seconds=0.25)
    async with running(app) as client:
        assert (await client.get("/report")).status_code == 200
    outputs.assert_silent(sentinel, SLOW_QUERY)


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


async def test_sync_engine_on_the_event_loop_is_reported(tmp_path, outputs: Outputs):
    app = _sqlite_app(tmp_path)
    sentinel = outputs.instrument(app)
    try:
        async with running(app) as client:
            assert (await client.get("/sync-in-async")).status_code == 200
        culprit = (HERE, line_of(HERE, "# blocks"))
        finding = outputs.assert_reported(
            sentinel, SYNC_DB_ON_EVENT_LOOP, "/sync-in-async", culprit
        )
        assert finding.evidence["driver"] == "pysqlite"
        assert finding.evidence["db_system_name"] == "sqlite"
    finally:
        app.state.sync_engine.dispose()


@pytest.mark.parametrize("route", ["/to-thread", "/sync-route", "/aiosqlite"])
async def test_sync_engine_off_the_loop_and_async_engines_are_healthy(
    route, tmp_path, outputs: Outputs
):
    app = _sqlite_app(tmp_path)
    sentinel = outputs.instrument(app)
    try:
        async with running(app) as client:
            assert (await client.get(route)).status_code == 200
        assert outputs.sample("asyncsentinel_request_db_queries_sum", http_route=route) == 1
        outputs.assert_silent(sentinel, SYNC_DB_ON_EVENT_LOOP)
    finally:
        app.state.sync_engine.dispose()


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


async def test_engine_created_in_a_request_is_reported(pg_url, outputs: Outputs):
    app = _engine_app(pg_url)
    sentinel = outputs.instrument(app)
    async with running(app) as client:
        assert (await client.get("/per-request")).status_code == 200
    culprit = (HERE, line_of(HERE, "# engine per request"))
    outputs.assert_reported(sentinel, ENGINE_CREATED_IN_REQUEST, "/per-request", culprit)


async def test_engine_created_at_startup_is_healthy(pg_url, outputs: Outputs):
    app = _engine_app(pg_url)
    sentinel = outputs.instrument(app)
    async with running(app) as client:
        assert (await client.get("/shared")).status_code == 200
    outputs.assert_silent(sentinel, ENGINE_CREATED_IN_REQUEST)


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


async def test_connection_still_checked_out_after_the_request_is_leaked(pg_url, outputs: Outputs):
    app, kept = _leaky_app(pg_url)
    sentinel = outputs.instrument(app, connection_leak_seconds=0.2)
    line = line_of(HERE, "# never closed")
    async with running(app) as client:
        assert (await client.get("/kept")).status_code == 200
        # The request span had ended: the event is on a finding span linked to it.
        finding = await outputs.wait_reported_after_request(
            sentinel, CONNECTION_LEAKED, "/kept", (HERE, line)
        )
        assert finding.evidence["garbage_collected"] is False
        assert finding.evidence["held_seconds"] >= 0.2
        await kept.pop().close()


async def test_connection_garbage_collected_while_checked_out_is_leaked(pg_url, outputs: Outputs):
    app, _ = _leaky_app(pg_url)
    sentinel = outputs.instrument(app, connection_leak_seconds=30)
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
        assert outputs.findings_total(CONNECTION_LEAKED, "/forgotten") == 1
        assert len(outputs.events(CONNECTION_LEAKED)) == 1


async def test_connection_closed_in_the_request_is_healthy(pg_url, outputs: Outputs):
    app, _ = _leaky_app(pg_url)
    sentinel = outputs.instrument(app, connection_leak_seconds=0.1)
    async with running(app) as client:
        assert (await client.get("/closed")).status_code == 200
        await asyncio.sleep(0.4)  # well past connection_leak_seconds
        gc.collect()
    outputs.assert_silent(sentinel, CONNECTION_LEAKED)


# --- pool_not_disposed ----------------------------------------------------------------------------
async def test_engine_not_disposed_at_shutdown_is_reported(pg_url, outputs: Outputs):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = create_async_engine(pg_url, pool_pre_ping=True)  # never disposed
        yield  # ... and no dispose() here

    app = FastAPI(lifespan=lifespan)
    add_select_one(app, lambda: app.state.engine)
    sentinel = outputs.instrument(app)
    line = line_of(HERE, "# never disposed")
    try:
        async with running(app) as client:
            assert (await client.get("/one")).status_code == 200
            assert sentinel.findings(POOL_NOT_DISPOSED) == []
        # The shutdown check ran when the lifespan ended.
        (finding,) = sentinel.findings(POOL_NOT_DISPOSED)
        assert culprit_of(finding) == (HERE, line)
        assert finding.evidence["idle"] == 1 and finding.evidence["used"] == 0
        assert outputs.findings_total(POOL_NOT_DISPOSED, "") == 1
        (_, event), *_ = outputs.events(POOL_NOT_DISPOSED)
        assert event.attributes["code.line.number"] == line
        assert any(
            f"outside a request at {HERE}:{line}" in m for m in outputs.log_lines(POOL_NOT_DISPOSED)
        )
    finally:
        await app.state.engine.dispose()


async def test_engine_created_before_instrumenting_is_still_checked_at_shutdown(
    pg_url, outputs: Outputs
):
    engine = create_async_engine(pg_url, pool_pre_ping=True)  # before the Sentinel exists
    app = FastAPI()
    add_select_one(app, lambda: engine)
    sentinel = outputs.instrument(app, engines=[engine])
    try:
        async with running(app) as client:
            assert (await client.get("/one")).status_code == 200
        (finding,) = sentinel.findings(POOL_NOT_DISPOSED)
        # Where it was created is unknown (asyncsentinel was not there yet); the pool name says
        # which engine it is.
        assert finding.culprit is None
        assert finding.evidence["pool"] == sentinel.instrument_engine(engine)
        assert finding.evidence["pool"] in outputs.log_lines(POOL_NOT_DISPOSED)[0]
    finally:
        await engine.dispose()


async def test_engine_disposed_in_the_lifespan_is_healthy(pg_url, outputs: Outputs):
    engine = create_async_engine(pg_url, pool_pre_ping=True)
    app = FastAPI(lifespan=dispose_at_shutdown(engine))
    add_select_one(app, lambda: engine)
    sentinel = outputs.instrument(app)
    async with running(app) as client:
        assert (await client.get("/one")).status_code == 200
    outputs.assert_silent(sentinel, POOL_NOT_DISPOSED)


# --- pool_pre_ping advice -------------------------------------------------------------------------
def _app_creating_engine(url: str, **options: object) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        app.state.engine = create_async_engine(url, **options)  # engine options
        yield
        await app.state.engine.dispose()

    app = FastAPI(lifespan=lifespan)
    add_select_one(app, lambda: app.state.engine)
    return app


async def test_pool_pre_ping_off_gets_advice_once(pg_url, outputs: Outputs):
    app = _app_creating_engine(pg_url)
    sentinel = outputs.instrument(app)
    line = line_of(HERE, "# engine options")
    async with running(app) as client:
        for _ in range(3):
            assert (await client.get("/one")).status_code == 200
    (advice,) = sentinel.findings(DB_CONFIGURATION_ADVICE)
    assert advice.severity is Severity.INFO
    assert advice.evidence["setting"] == "pool_pre_ping"
    assert advice.culprit is not None and advice.culprit.lineno == line
    assert outputs.findings_total(DB_CONFIGURATION_ADVICE, "") == 1
    (record,) = [
        r
        for r in outputs.logs.records
        if r.getMessage().startswith("asyncsentinel db_configuration_advice")
    ]
    assert record.levelname == "INFO" and f"{HERE}:{line}" in record.getMessage()
    assert len(outputs.events(DB_CONFIGURATION_ADVICE)) == 1


async def test_pool_pre_ping_on_gets_no_advice(pg_url, outputs: Outputs):
    app = _app_creating_engine(pg_url, pool_pre_ping=True)
    sentinel = outputs.instrument(app)
    async with running(app) as client:
        assert (await client.get("/one")).status_code == 200
    pre_ping = [
        f
        for f in sentinel.findings(DB_CONFIGURATION_ADVICE)
        if f.evidence.get("setting") == "pool_pre_ping"
    ]
    assert pre_ping == []


# --- nothing secret leaves the process ------------------------------------------------------------
async def test_literals_and_bind_values_appear_in_no_output(pg_url, outputs: Outputs):
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

    sentinel = outputs.instrument(app, slow_query_seconds=1e-6, connection_leak_seconds=0.05)
    async with running(app) as client:
        assert (await client.get("/secret")).json() == {"ok": "True"}
    kinds = {f.kind for f in sentinel.findings()}
    assert {"n_plus_one", "slow_query"} <= kinds
    outputs_text = [sentinel.render_metrics()[0].decode()]
    for span in outputs.spans.get_finished_spans():
        outputs_text.append(span.name)
        outputs_text.append(json.dumps(dict(span.attributes or {}), default=str))
        outputs_text.extend(json.dumps(dict(e.attributes or {}), default=str) for e in span.events)
    for record in outputs.logs.records:
        outputs_text.append(record.getMessage())
        outputs_text.append(json.dumps(getattr(record, "asyncsentinel", {}), default=str))
    outputs_text.extend(json.dumps(f.as_dict(), default=str) for f in sentinel.findings())
    everything = "\n".join(outputs_text)
    assert "SELECT ? AS a, CAST(? AS text) AS b, ? AS c" in everything
    for secret in ("s3cr3t", "42424242"):
        assert secret not in everything
