"""SQLAlchemy source over a real uvicorn server and real PostgreSQL: N+1 queries, pool
exhaustion and exact pool accounting under load."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

from asyncsentinel import N_PLUS_ONE, POOL_EXHAUSTED
from tests.sources.dbapps import Order, Outputs, culprit_of, dispose_at_shutdown, wait_until
from tests.support import line_of, serve

HERE = __file__


def _orders_app(url: str) -> tuple[FastAPI, object]:
    engine = create_async_engine(url, pool_pre_ping=True)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    app = FastAPI(lifespan=dispose_at_shutdown(engine))

    @app.get("/orders/lazy")
    async def lazy_orders() -> list[str]:
        async with sessions() as session:
            orders = (await session.scalars(select(Order).order_by(Order.id).limit(8))).all()
            return [(await order.awaitable_attrs.customer).name for order in orders]  # N+1 here

    @app.get("/orders/eager")
    async def eager_orders() -> list[str]:
        async with sessions() as session:
            query = select(Order).options(selectinload(Order.customer)).order_by(Order.id).limit(8)
            orders = (await session.scalars(query)).all()
            return [order.customer.name for order in orders]

    @app.get("/orders/loop")
    async def orders_in_a_loop() -> list[int]:
        totals = []
        async with sessions() as session:
            for order_id in range(1, 7):
                order = await session.scalar(select(Order).where(Order.id == order_id))  # per row
                totals.append(order.total)
        return totals

    return app, engine


async def test_n_plus_one_through_awaitable_attrs_is_reported_with_the_culprit_line(
    pg_url, outputs: Outputs
):
    app, _ = _orders_app(pg_url)
    sentinel = outputs.instrument(app)
    line = line_of(HERE, "# N+1 here")
    with serve(app) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.get("/orders/lazy")
        assert response.status_code == 200 and len(response.json()) == 8
        wait_until(lambda: outputs.findings_total(N_PLUS_ONE, "/orders/lazy") == 1)
    finding = outputs.assert_reported(sentinel, N_PLUS_ONE, "/orders/lazy", (HERE, line))
    assert finding.evidence["count"] == 8  # one lazy load per order
    assert finding.evidence["statement"].startswith("SELECT asdb_customers.id")
    assert finding.evidence["db_system_name"] == "postgresql"
    # The request span carries the event with the culprit, and the query count.
    (span, _), *_ = outputs.events(N_PLUS_ONE)
    assert span.attributes["asyncsentinel.db.query_count"] == 9  # the orders + 8 customers
    assert span.attributes["asyncsentinel.db.duration"] > 0
    (log_line,) = outputs.log_lines(N_PLUS_ONE)
    assert f"on GET /orders/lazy at {HERE}:{line}" in log_line
    assert "Stack (most recent call last)" in log_line
    assert outputs.sample("asyncsentinel_request_db_queries_sum", http_route="/orders/lazy") == 9


async def test_selectinload_healthy_twin_reports_no_n_plus_one(pg_url, outputs: Outputs):
    app, _ = _orders_app(pg_url)
    sentinel = outputs.instrument(app)
    with serve(app) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.get("/orders/eager")
        assert response.status_code == 200 and len(response.json()) == 8
        outputs.wait_for_requests("/orders/eager", 1)
    assert outputs.sample("asyncsentinel_request_db_queries_sum", http_route="/orders/eager") == 2
    outputs.assert_silent(sentinel, N_PLUS_ONE)


async def test_per_row_queries_in_a_loop_are_n_plus_one(pg_url, outputs: Outputs):
    app, _ = _orders_app(pg_url)
    sentinel = outputs.instrument(app)
    line = line_of(HERE, "# per row")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/orders/loop")).status_code == 200
        assert (await client.get("/orders/loop")).status_code == 200
    # Once per request: two requests, two findings; each counts the 6 executions.
    assert outputs.findings_total(N_PLUS_ONE, "/orders/loop") == 2
    findings = sentinel.findings(N_PLUS_ONE)
    assert [f.evidence["count"] for f in findings] == [6, 6]
    assert [culprit_of(f) for f in findings] == [(HERE, line), (HERE, line)]
    # The second request reuses the stack walked for the first: the same, whole stack.
    assert findings[0].stack == findings[1].stack
    assert any(loc.filename.endswith("httpx/_transports/asgi.py") for loc in findings[1].stack)
    assert len(outputs.events(N_PLUS_ONE)) == 2


def _pool_app(url: str, **pool: object) -> FastAPI:
    engine = create_async_engine(url, pool_pre_ping=True, **pool)
    app = FastAPI(lifespan=dispose_at_shutdown(engine))
    app.state.engine = engine

    @app.get("/hold/{seconds}")
    async def hold(seconds: float) -> JSONResponse:
        try:
            async with engine.connect() as conn:  # pool culprit
                await conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
        except sa_exc.TimeoutError:
            return JSONResponse({"error": "database busy"}, status_code=503)
        return JSONResponse({"held": seconds})

    return app


HOLD = "/hold/{seconds}"


async def test_pool_exhausted_when_checkouts_wait_for_a_small_pool(pg_url, outputs: Outputs):
    app = _pool_app(pg_url, pool_size=1, max_overflow=0, pool_timeout=30)
    sentinel = outputs.instrument(app, pool_wait_seconds=0.1)
    line = line_of(HERE, "# pool culprit")
    pool_name = sentinel.instrument_engine(app.state.engine, name="orders-db")
    with serve(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            responses = await asyncio.gather(*(client.get("/hold/0.4") for _ in range(3)))
        assert [r.status_code for r in responses] == [200, 200, 200]
        outputs.wait_for_requests(HOLD, 3)
    assert pool_name == "orders-db"
    # At least one: the requests that queued behind the one holding the connection.
    finding = outputs.assert_reported(sentinel, POOL_EXHAUSTED, HOLD, (HERE, line), count=None)
    evidence = finding.evidence
    assert evidence["pool"] == "orders-db"
    assert evidence["pool_size"] == 1 and evidence["max_overflow"] == 0
    assert evidence["used"] == 1 and evidence["waiters"] >= 1 and evidence["timed_out"] is False
    assert evidence["wait_seconds"] > 0.1
    # Every checkout came back: nothing used, nothing waiting, nothing timed out.
    used = {"db_client_connection_state": "used"}
    assert outputs.pool_sample("db_client_connection_count", "orders-db", **used) == 0
    assert outputs.pool_sample("db_client_connection_pending_requests", "orders-db") == 0
    assert outputs.pool_sample("db_client_connection_timeouts_total", "orders-db") == 0
    assert outputs.pool_sample("db_client_connection_max", "orders-db") == 1


async def test_pool_exhausted_when_a_checkout_times_out(pg_url, outputs: Outputs):
    app = _pool_app(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    sentinel = outputs.instrument(app, pool_wait_seconds=5.0)
    name = sentinel.instrument_engine(app.state.engine)
    with serve(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            responses = await asyncio.gather(client.get("/hold/1.5"), client.get("/hold/1.5"))
        assert sorted(r.status_code for r in responses) == [200, 503]
        outputs.wait_for_requests(HOLD, 2)
    assert outputs.pool_sample("db_client_connection_timeouts_total", name) == 1
    (finding,) = sentinel.findings(POOL_EXHAUSTED)
    assert finding.evidence["timed_out"] is True
    assert finding.evidence["pool_timeout_seconds"] == pytest.approx(0.3)
    assert finding.culprit is not None and finding.culprit.lineno == line_of(HERE, "# pool culprit")
    assert outputs.findings_total(POOL_EXHAUSTED, HOLD) == 1
    assert len(outputs.events(POOL_EXHAUSTED)) == 1


async def test_pool_healthy_twin_sequential_requests_never_wait(pg_url, outputs: Outputs):
    app = _pool_app(pg_url, pool_size=1, max_overflow=0, pool_timeout=30)
    sentinel = outputs.instrument(app, pool_wait_seconds=0.1)
    with serve(app) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            for _ in range(3):
                assert (await client.get("/hold/0.05")).status_code == 200
        outputs.wait_for_requests(HOLD, 3)
    assert sentinel.findings(POOL_EXHAUSTED) == []
    assert outputs.events(POOL_EXHAUSTED) == []


async def test_pool_accounting_is_exact_after_200_concurrent_requests(pg_url, outputs: Outputs):
    app = _pool_app(pg_url, pool_size=3, max_overflow=2, pool_timeout=60)
    sentinel = outputs.instrument(app)
    engine = app.state.engine
    name = sentinel.instrument_engine(engine, name="load")

    def level(state: str) -> float:
        return outputs.pool_sample(
            "db_client_connection_count", name, db_client_connection_state=state
        )

    with serve(app) as base:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
            responses = await asyncio.gather(*(client.get("/hold/0") for _ in range(200)))
        assert {r.status_code for r in responses} == {200}
        outputs.wait_for_requests(HOLD, 200)
        checkouts = outputs.pool_sample("db_client_connection_wait_time_seconds_count", name)
        checkins = outputs.pool_sample("db_client_connection_use_time_seconds_count", name)
        assert checkouts == checkins == 200
        assert level("used") == 0
        assert outputs.pool_sample("db_client_connection_pending_requests", name) == 0
        # Overflow connections were closed on return; the pool keeps at most pool_size.
        assert level("idle") == engine.sync_engine.pool.checkedin() <= 3
        created = outputs.pool_sample("db_client_connection_create_time_seconds_count", name)
        assert 1 <= created <= 200
        assert outputs.pool_sample("db_client_connection_max", name) == 5
    # The lifespan disposed the engine: no connection is left.
    assert level("idle") == 0 and level("used") == 0
