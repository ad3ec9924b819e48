"""Shared pieces of the database source tests: a small ORM schema on real PostgreSQL, an ASGI
lifespan driver for in-process apps, and polling helpers.

Tables are prefixed ``asdb_`` so they never collide with other tests using the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import ForeignKey, String, text
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from tests.support import asyncpg_sqlalchemy_url

CUSTOMERS = 10
ORDERS = 30


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "asdb_customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "asdb_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("asdb_customers.id"))
    total: Mapped[int]
    customer: Mapped[Customer] = relationship(back_populates="orders")


async def _create_schema(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(
                Customer.__table__.insert(),
                [{"id": i, "name": f"customer {i}"} for i in range(1, CUSTOMERS + 1)],
            )
            # Order i belongs to customer ((i - 1) % 10) + 1: the first ten orders all have
            # different customers, so each lazy load of order.customer is a query.
            await conn.execute(
                Order.__table__.insert(),
                [
                    {"id": i, "customer_id": (i - 1) % CUSTOMERS + 1, "total": i * 10}
                    for i in range(1, ORDERS + 1)
                ],
            )
            await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def pg_url(postgres_url: str) -> str:
    """A ``postgresql+asyncpg://`` URL of the test database, with the asdb_ tables seeded."""
    url = asyncpg_sqlalchemy_url(postgres_url)
    asyncio.run(_create_schema(url))
    return url


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run *app*'s lifespan on this loop and yield an in-process client (httpx ASGITransport).

    Shutdown runs when the block ends, so shutdown checks (pool_not_disposed) can be asserted
    right after it, and engines can still be disposed on the loop that opened them.
    """
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    assert started["type"] == "lifespan.startup.complete", started
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        stopped = await outbox.get()
        assert stopped["type"] == "lifespan.shutdown.complete", stopped
        await task


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll *predicate* (the server finishes a request after the client got its response)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


async def async_wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Like :func:`wait_until` without blocking the running loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def line_of(path: str, marker: str) -> int:
    """The line number of the only line of *path* that contains *marker*."""
    lines = [
        number
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1)
        if marker in line and f'"{marker}"' not in line  # not the test quoting it
    ]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


def events_named(spans: Any, name: str) -> Iterator[tuple[Any, Any]]:
    """(span, event) pairs of every finished span's events called *name*."""
    for span in spans.get_finished_spans():
        for event in span.events:
            if event.name == name:
                yield span, event


def dispose_at_shutdown(*engines: AsyncEngine) -> Any:
    """A FastAPI lifespan that disposes *engines* at shutdown, as the reference patterns say."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        for engine in engines:
            await engine.dispose()

    return lifespan


def instrument_app(app: Any, registry: Any, tracer_provider: Any, **options: Any) -> Any:
    """``asyncsentinel.instrument`` as the tests use it: test registry and tracer, a recording
    request span (server_span=True) and no log rate limit."""
    import asyncsentinel

    return asyncsentinel.instrument(
        app,
        registry=registry,
        tracer_provider=tracer_provider,
        log_rate_limit_seconds=0,
        server_span=True,
        **options,
    )


def log_lines(caplog: pytest.LogCaptureFixture, kind: str) -> list[str]:
    """Messages of the asyncsentinel log records of finding *kind*."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "asyncsentinel" and r.getMessage().startswith(f"asyncsentinel {kind} ")
    ]
