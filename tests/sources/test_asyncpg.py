"""asyncpg source: a directly used asyncpg pool on real PostgreSQL, through in-process apps."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from asyncsentinel import (
    CONNECTION_LEAKED,
    N_PLUS_ONE,
    POOL_EXHAUSTED,
    POOL_NOT_DISPOSED,
    SLOW_QUERY,
    ConfigError,
)
from asyncsentinel.sources.asyncpg import default_pool_name
from tests.sources.dbapps import Outputs, async_wait_until, running
from tests.support import line_of

HERE = __file__
ROUTE = "/hold/{seconds}"
USED = {"db_client_connection_state": "used"}


def _app(postgres_url: str, *, close_pool: bool = True, **pool_options: Any) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(postgres_url, **pool_options)  # pool created
        app.state.asyncsentinel.instrument_asyncpg_pool(app.state.pool, name="direct")
        yield
        if close_pool:
            await app.state.pool.close()

    app = FastAPI(lifespan=lifespan)
    app.state.kept = []

    @app.get("/hold/{seconds}")
    async def hold(seconds: float, timeout: float | None = None) -> JSONResponse:
        try:
            async with app.state.pool.acquire(timeout=timeout) as conn:  # acquire culprit
                await conn.execute("SELECT pg_sleep($1)", seconds)
        except TimeoutError:
            return JSONResponse({"error": "database busy"}, status_code=503)
        return JSONResponse({"held": seconds})

    @app.get("/kept")
    async def kept() -> dict[str, int]:
        conn = await app.state.pool.acquire()  # never released
        app.state.kept.append(conn)
        return {"one": await conn.fetchval("SELECT 1")}

    @app.get("/fetch")
    async def fetch() -> dict[str, int]:
        return {"one": await app.state.pool.fetchval("SELECT 1")}

    @app.get("/rows/per-row")
    async def rows_per_row() -> dict[str, list[str]]:
        names, secret = [], "hun" + "ter2"  # a literal and a bind value that must not leak
        query = f"SELECT $1::int AS n, '{secret}' AS tag, $2::text AS token"
        async with app.state.pool.acquire() as conn:
            for n in range(6):
                row = await conn.fetchrow(query, n, secret)  # per row
                names.append(f"{row['n']}")
        return {"names": names}

    @app.get("/rows/batched")
    async def rows_batched() -> dict[str, list[str]]:
        async with app.state.pool.acquire() as conn:
            rows = await conn.fetch("SELECT n FROM unnest($1::int[]) AS n", list(range(6)))
        await app.state.pool.execute("SELECT 1")
        return {"names": [f"{r['n']}" for r in rows]}

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await app.state.pool.execute("SELECT pg_sleep(0.3)")  # slow statement
        return {"ok": "slow"}

    return app


async def test_pool_accounting_is_exact_under_concurrency(postgres_url, outputs: Outputs):
    app = _app(postgres_url, min_size=1, max_size=4)
    outputs.instrument(app)

    def metric(name: str, **labels: str) -> float:
        return outputs.pool_sample(name, "direct", **labels)

    async with running(app) as client:
        responses = await asyncio.gather(*(client.get("/fetch") for _ in range(100)))
        assert {r.status_code for r in responses} == {200}
        pool = app.state.pool
        assert metric("db_client_connection_wait_time_seconds_count") == 100
        assert metric("db_client_connection_use_time_seconds_count") == 100
        assert metric("db_client_connection_count", **USED) == 0
        assert metric("db_client_connection_count", db_client_connection_state="idle") == (
            pool.get_idle_size()
        )
        assert metric("db_client_connection_pending_requests") == 0
        assert metric("db_client_connection_max") == 4
        assert 1 <= metric("db_client_connection_create_time_seconds_count") <= 4


async def test_acquire_waiting_for_a_busy_pool_is_pool_exhausted(postgres_url, outputs: Outputs):
    app = _app(postgres_url, min_size=1, max_size=1)
    sentinel = outputs.instrument(app, pool_wait_seconds=0.1)
    line = line_of(HERE, "# acquire culprit")
    async with running(app) as client:
        responses = await asyncio.gather(*(client.get("/hold/0.4") for _ in range(3)))
        assert [r.status_code for r in responses] == [200, 200, 200]
    finding = outputs.assert_reported(sentinel, POOL_EXHAUSTED, ROUTE, (HERE, line), count=2)
    assert finding.evidence["pool"] == "direct" and finding.evidence["pool_size"] == 1
    assert finding.evidence["used"] == 1 and finding.evidence["timed_out"] is False
    assert finding.evidence["wait_seconds"] > 0.1
    assert outputs.pool_sample("db_client_connection_count", "direct", **USED) == 0


async def test_acquire_timeout_is_pool_exhausted(postgres_url, outputs: Outputs):
    app = _app(postgres_url, min_size=1, max_size=1)
    sentinel = outputs.instrument(app, pool_wait_seconds=5)
    async with running(app) as client:
        slow = asyncio.create_task(client.get("/hold/1.0"))
        await async_wait_until(
            lambda: outputs.pool_sample("db_client_connection_count", "direct", **USED) == 1
        )
        busy = await client.get("/hold/0", params={"timeout": 0.2})
        assert busy.status_code == 503
        assert (await slow).status_code == 200
    assert outputs.pool_sample("db_client_connection_timeouts_total", "direct") == 1
    (finding,) = sentinel.findings(POOL_EXHAUSTED)
    assert finding.evidence["timed_out"] is True
    assert finding.culprit is not None and finding.culprit.lineno == line_of(
        HERE, "# acquire culprit"
    )
    assert len(outputs.events(POOL_EXHAUSTED)) == 1


async def test_pool_with_room_healthy_twin(postgres_url, outputs: Outputs):
    app = _app(postgres_url, min_size=3, max_size=3)
    sentinel = outputs.instrument(app, pool_wait_seconds=0.1)
    async with running(app) as client:
        responses = await asyncio.gather(*(client.get("/hold/0.2") for _ in range(3)))
        assert [r.status_code for r in responses] == [200, 200, 200]
    assert sentinel.findings(POOL_EXHAUSTED) == []
    assert outputs.events(POOL_EXHAUSTED) == []


async def test_connection_acquired_and_never_released_is_leaked(postgres_url, outputs: Outputs):
    app = _app(postgres_url, min_size=1, max_size=2)
    sentinel = outputs.instrument(app, connection_leak_seconds=0.2)
    line = line_of(HERE, "# never released")
    async with running(app) as client:
        assert (await client.get("/kept")).status_code == 200
        finding = await outputs.wait_reported_after_request(
            sentinel, CONNECTION_LEAKED, "/kept", (HERE, line)
        )
        assert finding.evidence["pool"] == "direct"
        await app.state.pool.release(app.state.kept.pop())
        assert outputs.pool_sample("db_client_connection_count", "direct", **USED) == 0


async def test_released_connection_healthy_twin(postgres_url, outputs: Outputs):
    app = _app(postgres_url, min_size=1, max_size=2)
    sentinel = outputs.instrument(app, connection_leak_seconds=0.1)
    async with running(app) as client:
        assert (await client.get("/hold/0")).status_code == 200
        assert (await client.get("/fetch")).status_code == 200
        await asyncio.sleep(0.4)  # well past connection_leak_seconds
    assert sentinel.findings(CONNECTION_LEAKED) == []


async def test_pool_never_closed_is_reported_at_shutdown(postgres_url, outputs: Outputs):
    app = _app(postgres_url, close_pool=False, min_size=2, max_size=2)
    sentinel = outputs.instrument(app)
    try:
        async with running(app) as client:
            assert (await client.get("/fetch")).status_code == 200
        (finding,) = sentinel.findings(POOL_NOT_DISPOSED)
        assert finding.evidence["pool"] == "direct" and finding.evidence["idle"] == 2
        assert outputs.findings_total(POOL_NOT_DISPOSED, "") == 1
        assert len(outputs.events(POOL_NOT_DISPOSED)) == 1
        assert any("'direct'" in m for m in outputs.log_lines(POOL_NOT_DISPOSED))
    finally:
        await app.state.pool.close()


async def test_pool_closed_at_shutdown_healthy_twin(postgres_url, outputs: Outputs):
    app = _app(postgres_url, min_size=2, max_size=2)
    sentinel = outputs.instrument(app)
    async with running(app) as client:
        assert (await client.get("/fetch")).status_code == 200
    assert sentinel.findings(POOL_NOT_DISPOSED) == []


async def test_uninstall_restores_the_pool_class(postgres_url, make_sentinel):
    originals = {
        name: asyncpg.pool.Pool.__dict__[name]
        for name in ("_acquire", "release", "_get_new_connection")
    }
    sentinel = make_sentinel()
    assert all(asyncpg.pool.Pool.__dict__[n] is not f for n, f in originals.items())
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    try:
        assert sentinel.instrument_asyncpg_pool(pool).startswith("postgresql://")
        sentinel.close()
        assert all(asyncpg.pool.Pool.__dict__[n] is f for n, f in originals.items())
        assert await pool.fetchval("SELECT 1") == 1  # still works, unobserved
    finally:
        await pool.close()


async def test_instrument_pool_rejects_other_objects(make_sentinel):
    sentinel = make_sentinel()
    with pytest.raises(TypeError, match=r"asyncpg\.Pool"):
        sentinel.instrument_asyncpg_pool(object())
    off = make_sentinel(sqlalchemy=False)
    with pytest.raises(ConfigError, match="sqlalchemy=True"):
        off.instrument_asyncpg_pool(object())


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        (
            ("postgresql://user:s3cr3t@db.example:6432/shop?sslmode=require",),
            {},
            "postgresql://db.example:6432/shop",
        ),
        (
            ("postgres://u@/shop?host=/var/run/postgresql",),
            {},
            "postgresql:///var/run/postgresql/shop",
        ),
        (
            (),
            {"host": "10.0.0.5", "port": 5432, "database": "orders", "password": "s3cr3t"},
            "postgresql://10.0.0.5:5432/orders",
        ),
    ],
)
async def test_default_pool_name_has_no_credentials(args, kwargs, name):
    pool = asyncpg.pool.Pool(
        *args,
        min_size=1,
        max_size=1,
        max_queries=1,
        max_inactive_connection_lifetime=0,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        **kwargs,
    )
    assert default_pool_name(pool) == name


def _statements(outputs: Outputs, operation: str, pool: str = "direct") -> float:
    return outputs.sample(
        "db_client_operation_duration_seconds_count",
        db_system_name="postgresql",
        db_operation_name=operation,
        db_client_connection_pool_name=pool,
    )


async def test_statements_of_a_registered_pool_are_timed_and_counted_per_request(
    postgres_url, outputs: Outputs
):
    app = _app(postgres_url, min_size=1, max_size=2)
    outputs.instrument(app)
    async with running(app) as client:
        assert (await client.get("/rows/batched")).status_code == 200
        assert (await client.get("/fetch")).status_code == 200
    assert _statements(outputs, "SELECT") == 3  # conn.fetch, pool.execute, pool.fetchval
    assert outputs.sample("asyncsentinel_request_db_queries_sum", http_route="/rows/batched") == 2
    assert outputs.sample("asyncsentinel_request_db_queries_sum", http_route="/fetch") == 1
    (span,) = [s for s in outputs.spans.get_finished_spans() if s.name == "GET /rows/batched"]
    assert span.attributes is not None
    assert span.attributes["asyncsentinel.db.query_count"] == 2


async def test_per_row_statements_through_an_asyncpg_pool_are_n_plus_one(
    postgres_url, outputs: Outputs
):
    app = _app(postgres_url, min_size=1, max_size=2)
    sentinel = outputs.instrument(app)
    async with running(app) as client:
        assert (await client.get("/rows/per-row")).status_code == 200
    finding = outputs.assert_reported(
        sentinel, N_PLUS_ONE, "/rows/per-row", (HERE, line_of(HERE, "# per row"))
    )
    assert finding.evidence["count"] == 6 and finding.evidence["pool"] == "direct"
    assert finding.evidence["statement"] == "SELECT ?::int AS n, ? AS tag, ?::text AS token"
    # Neither the literal nor the bind values leave the process.
    assert "hunter2" not in repr(sentinel.findings()) + "".join(outputs.log_lines(N_PLUS_ONE))
    assert all("hunter2" not in str(event.attributes) for _, event in outputs.events(N_PLUS_ONE))


async def test_batched_statements_through_an_asyncpg_pool_healthy_twin(
    postgres_url, outputs: Outputs
):
    app = _app(postgres_url, min_size=1, max_size=2)
    sentinel = outputs.instrument(app, slow_query_seconds=5)
    async with running(app) as client:
        for _ in range(3):
            assert (await client.get("/rows/batched")).status_code == 200
    outputs.assert_silent(sentinel, N_PLUS_ONE)
    outputs.assert_silent(sentinel, SLOW_QUERY)


async def test_slow_statement_through_an_asyncpg_pool_is_slow_query(postgres_url, outputs: Outputs):
    app = _app(postgres_url, min_size=1, max_size=2)
    sentinel = outputs.instrument(app, slow_query_seconds=0.1)
    async with running(app) as client:
        assert (await client.get("/slow")).status_code == 200
    finding = outputs.assert_reported(
        sentinel, SLOW_QUERY, "/slow", (HERE, line_of(HERE, "# slow statement"))
    )
    assert finding.evidence["pool"] == "direct" and finding.evidence["duration_seconds"] >= 0.3


async def test_statements_of_a_pool_nobody_registered_are_not_observed(
    postgres_url, outputs: Outputs
):
    app = FastAPI()

    @app.get("/unregistered")
    async def unregistered() -> dict[str, int]:
        pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
        try:
            return {"one": await pool.fetchval("SELECT 1")}
        finally:
            await pool.close()

    outputs.instrument(app)
    async with running(app) as client:
        assert (await client.get("/unregistered")).status_code == 200
    assert _statements(outputs, "SELECT") == 0
    assert outputs.sample("asyncsentinel_request_db_queries_sum", http_route="/unregistered") == 0
