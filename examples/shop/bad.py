"""Misbehaving routes: one per mistake asyncsentinel finds, each a real instance of it.

Every route's docstring starts with the finding kind it triggers. They are grouped under
``/bad`` so that the healthy routes in :mod:`routes` stay clean controls. Do not copy them.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from fastapi import APIRouter, Request
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import lazyload

from .db import DbSession
from .models import Customer, Order, Product
from .routes import fetch_delivery_days, fetch_stock

router = APIRouter(prefix="/bad", tags=["misbehaving (do not copy)"])

BLOCK_SECONDS = 0.3
"""How long the event-loop-blocking routes block (the default threshold is 0.1 s)."""
HOLD_SECONDS = 0.6
"""How long ``/bad/hold-connection`` keeps its connection while waiting for the warehouse."""
SLOW_QUERY_ROWS = 3_000_000
"""Rows the recursive CTE of ``/bad/slow-report`` counts on SQLite (about a second)."""
SLOW_QUERY_SECONDS = 0.8
"""``pg_sleep`` of ``/bad/slow-report`` on PostgreSQL."""
LEAKED_TASK_SECONDS = 3.0
"""How long the fire-and-forget task of ``/bad/fire-and-forget`` outlives its request."""


# --- database ----------------------------------------------------------------------------------
@router.get("/orders-per-row")
async def orders_per_row(db: DbSession) -> list[dict[str, Any]]:
    """n_plus_one: one query for the orders, then one more query per order for its product."""
    orders = (await db.scalars(select(Order).order_by(Order.id).limit(20))).all()
    out = []
    for order in orders:
        product = await db.scalar(select(Product).where(Product.id == order.product_id))
        out.append({"order": order.id, "product": product.name if product else None})
    return out


@router.get("/customers-lazy-orders")
async def customers_lazy_orders(db: DbSession) -> dict[str, int]:
    """n_plus_one: ``awaitable_attrs`` lazy-loads each customer's orders, one query each.

    ``lazyload()`` switches the relationship back to SQLAlchemy's default loading, as if it had
    been declared without ``lazy="raise"``.
    """
    customers = await db.scalars(select(Customer).options(lazyload(Customer.orders)))
    counts = {}
    for customer in customers.all():
        counts[customer.name] = len(await customer.awaitable_attrs.orders)
    return counts


@router.get("/slow-report")
async def slow_report(db: DbSession) -> dict[str, int]:
    """slow_query: one statement that takes most of a second (``pg_sleep`` / a recursive CTE)."""
    if db.get_bind().dialect.name == "postgresql":
        await db.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": SLOW_QUERY_SECONDS})
        return {"rows": 0}
    rows = await db.scalar(
        text(
            "WITH RECURSIVE counter(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM counter "
            "WHERE n < :rows) SELECT count(*) FROM counter"
        ),
        {"rows": SLOW_QUERY_ROWS},
    )
    return {"rows": int(rows or 0)}


@router.get("/hold-connection")
async def hold_connection(request: Request, db: DbSession, product_id: int = 1) -> dict[str, int]:
    """pool_exhausted: keeps its pooled connection while it waits for a slow HTTP call.

    The session checked a connection out for the first query and only gives it back when the
    request ends, so a few concurrent requests drain the small pool and the rest wait (and,
    past ``pool_timeout``, fail with SQLAlchemy's ``QueuePool limit ... reached``).
    """
    product = await db.get(Product, product_id)
    url = f"{request.app.state.warehouse_url}/stock/{product_id}?delay={HOLD_SECONDS}"
    async with request.app.state.http.get(url) as resp:
        available = int((await resp.json())["available"])
    return {"product_id": product.id if product else 0, "available": available}


# A module-level session shared by everything that imports this module.
_shared_session: AsyncSession | None = None


def _global_session(request: Request) -> AsyncSession:
    global _shared_session
    engine: AsyncEngine = request.app.state.engine
    if _shared_session is None or _shared_session.bind is not engine:
        _shared_session = request.app.state.session_factory()
    return _shared_session


async def _count(session: AsyncSession, model: type[Customer] | type[Product]) -> int:
    return int(await session.scalar(select(func.count()).select_from(model)) or 0)


@router.get("/global-session")
async def global_session(request: Request) -> dict[str, int]:
    """session_shared_across_tasks: two tasks (and every request) use one global session.

    Concurrent use of one ``AsyncSession`` is a race; SQLAlchemy often refuses it with
    "concurrent operations are not permitted" and the request fails.
    """
    session = _global_session(request)
    try:
        async with asyncio.TaskGroup() as tg:
            customers = tg.create_task(_count(session, Customer))
            products = tg.create_task(_count(session, Product))
        await session.commit()
    except BaseException:
        await session.rollback()
        raise
    return {"customers": customers.result(), "products": products.result()}


@router.get("/sync-engine")
async def sync_engine(request: Request) -> dict[str, int]:
    """sync_db_on_event_loop: a synchronous engine queries on the event loop's thread."""
    with request.app.state.legacy_engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM shop_orders")).scalar_one()
    return {"orders": int(count)}


@router.get("/engine-per-request")
async def engine_per_request(request: Request) -> dict[str, int]:
    """engine_created_in_request: builds (and disposes) a whole engine and pool per request."""
    engine = create_async_engine(request.app.state.database_url)
    try:
        async with engine.connect() as conn:
            count = await conn.scalar(select(func.count(Product.id)))
    finally:
        await engine.dispose()
    return {"products": int(count or 0)}


@router.get("/leak-connection")
async def leak_connection(request: Request) -> dict[str, int]:
    """connection_leaked: checks a connection out, keeps it "for later" and never closes it."""
    conn = await request.app.state.engine.connect()
    count = await conn.scalar(select(func.count(Order.id)))
    request.app.state.report_connections.append(conn)
    return {"orders": int(count or 0)}


@router.get("/undisposed-engine")
async def undisposed_engine(request: Request) -> dict[str, int]:
    """pool_not_disposed: uses the analytics engine, which the lifespan never disposes.

    Reported at shutdown: the engine still holds a pooled connection.
    """
    analytics: AsyncEngine = request.app.state.analytics_engine
    async with analytics.connect() as conn:
        count = await conn.scalar(select(func.count(Customer.id)))
    return {"customers": int(count or 0)}


@router.get("/lazy-load/{order_id}")
async def lazy_load(order_id: int, db: DbSession) -> dict[str, str]:
    """lazy_load_in_async: touches an unloaded relationship; SQLAlchemy raises MissingGreenlet.

    The request fails with a 500: that is the bug this route shows.
    """
    order = await db.scalar(
        select(Order).where(Order.id == order_id).options(lazyload(Order.customer))
    )
    if order is None:
        return {"customer": ""}
    return {"customer": order.customer.name}


# --- event loop ----------------------------------------------------------------------------------
@router.get("/blocking-sleep")
async def blocking_sleep() -> dict[str, float]:
    """event_loop_blocked: ``time.sleep`` in async code stops every other request."""
    time.sleep(BLOCK_SECONDS)
    return {"slept": BLOCK_SECONDS}


def _score_products(seconds: float) -> int:
    """Pure-Python number crunching, standing in for scoring, parsing or hashing."""
    score = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for i in range(2_000):
            score = (score * 31 + i) % 1_000_003
    return score


@router.get("/cpu-loop")
async def cpu_loop() -> dict[str, int]:
    """event_loop_blocked: CPU-bound work on the loop (it belongs in a thread or process)."""
    return {"score": _score_products(BLOCK_SECONDS)}


def _read_export(path: Path, seconds: float) -> int:
    """Reads the catalogue export 4 KiB at a time, like a big file on a slow network share."""
    total = 0
    deadline = time.perf_counter() + seconds
    with path.open("rb", buffering=0) as export:
        while time.perf_counter() < deadline:
            chunk = export.read(4096)
            if not chunk:
                export.seek(0)
            total += len(chunk)
    return total


@router.get("/blocking-read")
async def blocking_read(request: Request) -> dict[str, int]:
    """event_loop_blocked: synchronous file reads in async code (use ``asyncio.to_thread``)."""
    return {"bytes": _read_export(request.app.state.catalog_export, BLOCK_SECONDS)}


# --- tasks ---------------------------------------------------------------------------------------
async def _warm_recommendations(customer_id: int) -> None:
    await asyncio.sleep(LEAKED_TASK_SECONDS)  # stands in for slow background work


@router.get("/fire-and-forget/{customer_id}")
async def fire_and_forget(customer_id: int) -> dict[str, str]:
    """task_leaked: starts a task nobody awaits or tracks; it outlives the request."""
    asyncio.create_task(_warm_recommendations(customer_id))  # noqa: RUF006
    return {"status": "warming"}


async def _delivery_days_swallowing_cancel(request: Request, product_id: int) -> int:
    try:
        return await fetch_delivery_days(
            request.app.state.http, request.app.state.warehouse_url, product_id
        )
    except asyncio.CancelledError:
        return 7  # swallows the cancellation: the task "succeeds" after being cancelled


@router.get("/swallow-cancel/{product_id}")
async def swallow_cancel(product_id: int, request: Request) -> dict[str, int | str]:
    """cancellation_swallowed: the twin of ``/products/{id}/quote`` whose slow call returns a
    default instead of re-raising ``CancelledError`` when the timeout cancels it.
    """
    try:
        async with asyncio.timeout(0.3):
            async with asyncio.TaskGroup() as tg:
                stock = tg.create_task(
                    fetch_stock(request.app.state.http, request.app.state.warehouse_url, product_id)
                )
                days = tg.create_task(_delivery_days_swallowing_cancel(request, product_id))
        return {"available": stock.result(), "delivery_days": days.result(), "source": "supplier"}
    except TimeoutError:
        return {"available": 0, "delivery_days": 7, "source": "fallback"}


async def _audit_order_view(customer_id: int) -> None:
    raise LookupError(f"audit log has no partition for customer {customer_id}")


@router.get("/task-exception/{customer_id}")
async def task_exception(customer_id: int) -> dict[str, str]:
    """task_exception_unretrieved: a background task fails and nobody ever looks at it."""
    asyncio.create_task(_audit_order_view(customer_id))  # noqa: RUF006
    await asyncio.sleep(0)  # let it run (and fail) before the response
    return {"status": "ok"}


# --- HTTP client -------------------------------------------------------------------------------
@router.get("/session-per-request/{product_id}")
async def session_per_request(product_id: int, request: Request) -> dict[str, int]:
    """client_session_per_request: a new ClientSession (and connection pool) per request."""
    async with aiohttp.ClientSession() as http:
        available = await fetch_stock(http, request.app.state.warehouse_url, product_id)
    return {"product_id": product_id, "available": available}


@router.get("/unclosed-client-session/{product_id}")
async def unclosed_client_session(product_id: int, request: Request) -> dict[str, int]:
    """client_session_unclosed: opens a ClientSession and never closes it (found at shutdown)."""
    http = aiohttp.ClientSession()
    request.app.state.partner_sessions.append(http)
    available = await fetch_stock(http, request.app.state.warehouse_url, product_id)
    return {"product_id": product_id, "available": available}
