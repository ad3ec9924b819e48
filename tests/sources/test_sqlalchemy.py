"""SQLAlchemy source over a real uvicorn server and real PostgreSQL: N+1 queries, pool
exhaustion and exact pool accounting under load."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

from asyncsentinel import N_PLUS_ONE, POOL_EXHAUSTED
from tests.sources.dbapps import (
    Order,
    dispose_at_shutdown,
    events_named,
    instrument_app,
    line_of,
    log_lines,
    pg_url,
    wait_until,
)
from tests.support import sample, serve

__all__ = ["pg_url"]  # the fixture, imported so pytest finds it

HERE = __file__


def _instrument(
    app: FastAPI, registry: CollectorRegistry, tracer_provider: object, **options: object
):
    return instrument_app(app, registry, tracer_provider, **options)


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
    pg_url, registry, tracer_provider, spans, finding_logs
):
    app, _ = _orders_app(pg_url)
    sentinel = _instrument(app, registry, tracer_provider)
    line = line_of(HERE, "# N+1 here")
    try:
        with serve(app) as base:
            async with httpx.AsyncClient(base_url=base) as client:
                response = await client.get("/orders/lazy")
            assert response.status_code == 200 and len(response.json()) == 8
            wait_until(
                lambda: (
                    sample(
                        registry,
                        "asyncsentinel_findings_total",
                        kind=N_PLUS_ONE,
                        http_route="/orders/lazy",
                    )
                    == 1
                )
            )
        (finding,) = sentinel.findings(N_PLUS_ONE)
        assert finding.culprit is not None
        assert (finding.culprit.filename, finding.culprit.lineno) == (HERE, line)
        assert finding.evidence["count"] == 8  # one lazy load per order
        assert finding.evidence["statement"].startswith("SELECT asdb_customers.id")
        assert finding.evidence["db_system_name"] == "postgresql"
        # The request span carries the event with the culprit, and the query count.
        (span, event), *_ = events_named(spans, "asyncsentinel.n_plus_one")
        assert span.name == "GET /orders/lazy"
        assert event.attributes["code.file.path"] == HERE
        assert event.attributes["code.line.number"] == line
        assert span.attributes["asyncsentinel.db.query_count"] == 9  # the orders + 8 customers
        assert span.attributes["asyncsentinel.db.duration"] > 0
        (log_line,) = log_lines(finding_logs, N_PLUS_ONE)
        assert f"on GET /orders/lazy at {HERE}:{line}" in log_line
        assert "Stack (most recent call last)" in log_line
        assert (
            sample(registry, "asyncsentinel_request_db_queries_sum", http_route="/orders/lazy") == 9
        )
    finally:
        sentinel.close()


async def test_selectinload_healthy_twin_reports_no_n_plus_one(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    app, _ = _orders_app(pg_url)
    sentinel = _instrument(app, registry, tracer_provider)
    try:
        with serve(app) as base:
            async with httpx.AsyncClient(base_url=base) as client:
                response = await client.get("/orders/eager")
            assert response.status_code == 200 and len(response.json()) == 8
            wait_until(
                lambda: (
                    sample(
                        registry,
                        "asyncsentinel_request_db_queries_count",
                        http_route="/orders/eager",
                    )
                    == 1
                )
            )
        assert (
            sample(registry, "asyncsentinel_request_db_queries_sum", http_route="/orders/eager")
            == 2
        )
        assert sentinel.findings(N_PLUS_ONE) == []
        assert (
            sample(
                registry,
                "asyncsentinel_findings_total",
                kind=N_PLUS_ONE,
                http_route="/orders/eager",
            )
            == 0
        )
        assert list(events_named(spans, "asyncsentinel.n_plus_one")) == []
        assert log_lines(finding_logs, N_PLUS_ONE) == []
    finally:
        sentinel.close()


async def test_per_row_queries_in_a_loop_are_n_plus_one(pg_url, registry, tracer_provider, spans):
    app, _ = _orders_app(pg_url)
    sentinel = _instrument(app, registry, tracer_provider)
    line = line_of(HERE, "# per row")
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/orders/loop")).status_code == 200
            assert (await client.get("/orders/loop")).status_code == 200
        # Once per request: two requests, two findings; each counts the 6 executions.
        assert (
            sample(
                registry, "asyncsentinel_findings_total", kind=N_PLUS_ONE, http_route="/orders/loop"
            )
            == 2
        )
        findings = sentinel.findings(N_PLUS_ONE)
        assert [f.evidence["count"] for f in findings] == [6, 6]
        assert {(f.culprit.filename, f.culprit.lineno) for f in findings if f.culprit} == {
            (HERE, line)
        }
        assert len(list(events_named(spans, "asyncsentinel.n_plus_one"))) == 2
    finally:
        sentinel.close()


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


async def test_pool_exhausted_when_checkouts_wait_for_a_small_pool(
    pg_url, registry, tracer_provider, spans, finding_logs
):
    app = _pool_app(pg_url, pool_size=1, max_overflow=0, pool_timeout=30)
    sentinel = _instrument(app, registry, tracer_provider, pool_wait_seconds=0.1)
    line = line_of(HERE, "# pool culprit")
    pool_name = sentinel.instrument_engine(app.state.engine, name="orders-db")
    try:
        with serve(app) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                responses = await asyncio.gather(*(client.get("/hold/0.4") for _ in range(3)))
            assert [r.status_code for r in responses] == [200, 200, 200]
            wait_until(
                lambda: (
                    sample(
                        registry,
                        "asyncsentinel_request_db_queries_count",
                        http_route="/hold/{seconds}",
                    )
                    == 3
                )
            )
        assert pool_name == "orders-db"
        exhausted = sample(
            registry,
            "asyncsentinel_findings_total",
            kind=POOL_EXHAUSTED,
            http_route="/hold/{seconds}",
        )
        assert exhausted >= 1  # the requests that queued behind the one holding the connection
        finding = sentinel.findings(POOL_EXHAUSTED)[0]
        assert finding.culprit is not None and (
            finding.culprit.filename,
            finding.culprit.lineno,
        ) == (HERE, line)
        evidence = finding.evidence
        assert evidence["pool"] == "orders-db"
        assert evidence["pool_size"] == 1 and evidence["max_overflow"] == 0
        assert evidence["used"] == 1 and evidence["waiters"] >= 1 and evidence["timed_out"] is False
        assert evidence["wait_seconds"] > 0.1
        (span, event), *_ = events_named(spans, "asyncsentinel.pool_exhausted")
        assert span.name == "GET /hold/{seconds}" and event.attributes["code.line.number"] == line
        assert any(f"at {HERE}:{line}" in m for m in log_lines(finding_logs, POOL_EXHAUSTED))
        # Every checkout came back: nothing used, nothing waiting, nothing timed out.
        assert (
            sample(
                registry,
                "db_client_connection_count",
                db_client_connection_pool_name="orders-db",
                db_client_connection_state="used",
            )
            == 0
        )
        assert (
            sample(
                registry,
                "db_client_connection_pending_requests",
                db_client_connection_pool_name="orders-db",
            )
            == 0
        )
        assert (
            sample(
                registry,
                "db_client_connection_timeouts_total",
                db_client_connection_pool_name="orders-db",
            )
            == 0
        )
        assert (
            sample(registry, "db_client_connection_max", db_client_connection_pool_name="orders-db")
            == 1
        )
    finally:
        sentinel.close()


async def test_pool_exhausted_when_a_checkout_times_out(pg_url, registry, tracer_provider, spans):
    app = _pool_app(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    sentinel = _instrument(app, registry, tracer_provider, pool_wait_seconds=5.0)
    name = sentinel.instrument_engine(app.state.engine)
    try:
        with serve(app) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                responses = await asyncio.gather(client.get("/hold/1.5"), client.get("/hold/1.5"))
            assert sorted(r.status_code for r in responses) == [200, 503]
            wait_until(
                lambda: (
                    sample(
                        registry,
                        "asyncsentinel_request_db_queries_count",
                        http_route="/hold/{seconds}",
                    )
                    == 2
                )
            )
        assert (
            sample(
                registry, "db_client_connection_timeouts_total", db_client_connection_pool_name=name
            )
            == 1
        )
        (finding,) = sentinel.findings(POOL_EXHAUSTED)
        assert finding.evidence["timed_out"] is True
        assert finding.evidence["pool_timeout_seconds"] == pytest.approx(0.3)
        assert finding.culprit is not None and finding.culprit.lineno == line_of(
            HERE, "# pool culprit"
        )
        assert (
            sample(
                registry,
                "asyncsentinel_findings_total",
                kind=POOL_EXHAUSTED,
                http_route="/hold/{seconds}",
            )
            == 1
        )
        assert len(list(events_named(spans, "asyncsentinel.pool_exhausted"))) == 1
    finally:
        sentinel.close()


async def test_pool_healthy_twin_sequential_requests_never_wait(
    pg_url, registry, tracer_provider, spans
):
    app = _pool_app(pg_url, pool_size=1, max_overflow=0, pool_timeout=30)
    sentinel = _instrument(app, registry, tracer_provider, pool_wait_seconds=0.1)
    try:
        with serve(app) as base:
            async with httpx.AsyncClient(base_url=base) as client:
                for _ in range(3):
                    assert (await client.get("/hold/0.05")).status_code == 200
            wait_until(
                lambda: (
                    sample(
                        registry,
                        "asyncsentinel_request_db_queries_count",
                        http_route="/hold/{seconds}",
                    )
                    == 3
                )
            )
        assert sentinel.findings(POOL_EXHAUSTED) == []
        assert list(events_named(spans, "asyncsentinel.pool_exhausted")) == []
    finally:
        sentinel.close()


async def test_pool_accounting_is_exact_after_200_concurrent_requests(
    pg_url, registry, tracer_provider
):
    app = _pool_app(pg_url, pool_size=3, max_overflow=2, pool_timeout=60)
    sentinel = _instrument(app, registry, tracer_provider)
    engine = app.state.engine
    name = sentinel.instrument_engine(engine, name="load")

    def level(state: str) -> float:
        return sample(
            registry,
            "db_client_connection_count",
            db_client_connection_pool_name=name,
            db_client_connection_state=state,
        )

    try:
        with serve(app) as base:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
                responses = await asyncio.gather(*(client.get("/hold/0") for _ in range(200)))
            assert {r.status_code for r in responses} == {200}
            wait_until(
                lambda: (
                    sample(
                        registry,
                        "asyncsentinel_request_db_queries_count",
                        http_route="/hold/{seconds}",
                    )
                    == 200
                )
            )
            checkouts = sample(
                registry,
                "db_client_connection_wait_time_seconds_count",
                db_client_connection_pool_name=name,
            )
            checkins = sample(
                registry,
                "db_client_connection_use_time_seconds_count",
                db_client_connection_pool_name=name,
            )
            assert checkouts == checkins == 200
            assert level("used") == 0
            assert (
                sample(
                    registry,
                    "db_client_connection_pending_requests",
                    db_client_connection_pool_name=name,
                )
                == 0
            )
            # Overflow connections were closed on return; the pool keeps at most pool_size.
            assert level("idle") == engine.sync_engine.pool.checkedin() <= 3
            created = sample(
                registry,
                "db_client_connection_create_time_seconds_count",
                db_client_connection_pool_name=name,
            )
            assert 1 <= created <= 200
            assert (
                sample(registry, "db_client_connection_max", db_client_connection_pool_name=name)
                == 5
            )
        # The lifespan disposed the engine: no connection is left.
        assert level("idle") == 0 and level("used") == 0
    finally:
        sentinel.close()
