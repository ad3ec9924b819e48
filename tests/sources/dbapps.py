"""Shared pieces of the database source tests: a small ORM schema on real PostgreSQL, an ASGI
lifespan driver for in-process apps, polling helpers, and :class:`Outputs` — where a test reads
what a user sees of a finding (fixtures ``pg_url`` and ``outputs``, through conftest.py).

Tables are prefixed ``asdb_`` so they never collide with other tests using the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from sqlalchemy import ForeignKey, String, text
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import asyncsentinel
from asyncsentinel import Finding, Sentinel
from tests.support import asyncpg_sqlalchemy_url, sample, wait_for

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
    wait_for(predicate, timeout)


async def async_wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Like :func:`wait_until` without blocking the running loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def dispose_at_shutdown(*engines: AsyncEngine) -> Any:
    """A FastAPI lifespan that disposes *engines* at shutdown, as the reference patterns say."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        for engine in engines:
            await engine.dispose()

    return lifespan


def add_select_one(app: FastAPI, engine: Callable[[], AsyncEngine]) -> None:
    """A healthy ``GET /one``: one ``SELECT 1`` on a connection of ``engine()``, closed."""

    @app.get("/one")
    async def one() -> dict[str, int]:
        async with engine().connect() as conn:
            return {"one": (await conn.execute(text("SELECT 1"))).scalar_one()}


def culprit_of(finding: Finding) -> tuple[str, int] | None:
    """``(file, line)`` of the finding's culprit, ``None`` without one."""
    culprit = finding.culprit
    return None if culprit is None else (culprit.filename, culprit.lineno)


@dataclass(frozen=True)
class Outputs:
    """Where a test reads what a user sees of findings — the Prometheus registry, the finished
    spans, the ``asyncsentinel`` log records — and the apps it instruments to produce them."""

    registry: CollectorRegistry
    tracer_provider: TracerProvider
    spans: InMemorySpanExporter
    logs: pytest.LogCaptureFixture
    sentinels: list[Sentinel] = field(default_factory=list)
    """Made by :meth:`instrument`; the fixture closes them after the test."""

    def instrument(self, app: Any, **options: Any) -> Sentinel:
        """``asyncsentinel.instrument`` as the tests use it: the test's registry and tracer, a
        recording request span (server_span=True) and no log rate limit."""
        sentinel = asyncsentinel.instrument(
            app,
            registry=self.registry,
            tracer_provider=self.tracer_provider,
            log_rate_limit_seconds=0,
            server_span=True,
            **options,
        )
        self.sentinels.append(sentinel)
        return sentinel

    def sample(self, name: str, **labels: str) -> float:
        """One sample of the test's registry (0.0 when absent)."""
        return sample(self.registry, name, **labels)

    def findings_total(self, kind: str, route: str) -> float:
        """``asyncsentinel_findings_total`` of *kind* on *route* (``""``: outside requests)."""
        return self.sample("asyncsentinel_findings_total", kind=kind, http_route=route)

    def pool_sample(self, name: str, pool: str, **labels: str) -> float:
        """A ``db_client_connection_*`` sample of the pool named *pool*."""
        return self.sample(name, db_client_connection_pool_name=pool, **labels)

    def wait_for_requests(self, route: str, count: int) -> None:
        """Wait until *count* requests of *route* ended (a server finishes a request after its
        client got the response): their statement counts are in the registry."""
        wait_until(
            lambda: self.sample("asyncsentinel_request_db_queries_count", http_route=route) == count
        )

    def events(self, kind: str) -> list[tuple[Any, Any]]:
        """(span, event) of every span event of finding *kind*, in finishing order."""
        name = f"asyncsentinel.{kind}"
        return [
            (span, event)
            for span in self.spans.get_finished_spans()
            for event in span.events
            if event.name == name
        ]

    def log_lines(self, kind: str) -> list[str]:
        """Messages of the asyncsentinel log records of finding *kind*."""
        return [
            r.getMessage()
            for r in self.logs.records
            if r.name == "asyncsentinel" and r.getMessage().startswith(f"asyncsentinel {kind} ")
        ]

    def assert_reported(
        self,
        sentinel: Sentinel,
        kind: str,
        route: str,
        culprit: tuple[str, int],
        count: int | None = 1,
    ) -> Finding:
        """*count* findings of *kind* on ``GET route`` (``None``: at least one), in the metric
        and in the Sentinel; the first one's culprit is *culprit* (file, line), on its request
        span's event and in a log line too. Returns that finding."""
        total = self.findings_total(kind, route)
        if count is None:
            assert total >= 1
        else:
            assert total == count
        findings = sentinel.findings(kind)
        assert len(findings) == total
        assert culprit_of(findings[0]) == culprit
        (span, event), *_ = self.events(kind)
        assert span.name == f"GET {route}"
        assert (event.attributes["code.file.path"], event.attributes["code.line.number"]) == culprit
        path, line = culprit
        assert any(f"on GET {route} at {path}:{line}" in m for m in self.log_lines(kind))
        return findings[0]

    async def wait_reported_after_request(
        self, sentinel: Sentinel, kind: str, route: str, culprit: tuple[str, int]
    ) -> Finding:
        """Wait (without blocking the loop) until one finding of *kind* about a request of
        ``GET route`` that had ended is reported: culprit *culprit* (file, line), its span event
        on a span of its own linked to the request's, and a log line. Returns the finding."""
        await async_wait_until(lambda: self.findings_total(kind, route) == 1)
        (finding,) = sentinel.findings(kind)
        assert culprit_of(finding) == culprit
        (span, event), *_ = self.events(kind)
        assert (event.attributes["code.file.path"], event.attributes["code.line.number"]) == culprit
        assert span.links and event.attributes["http.route"] == route
        path, line = culprit
        assert any(f"on GET {route} at {path}:{line}" in m for m in self.log_lines(kind))
        return finding

    def wait_reported(self, kind: str, route: str, culprit: tuple[str, int]) -> dict[str, Any]:
        """Wait until a finding of *kind* on *route* (``""``: outside requests) reached all
        three outputs with its culprit at *culprit* (file, line); the attributes of its span
        event. For servers in a thread of their own, which finish requests after the client."""
        wait_until(lambda: self.findings_total(kind, route) >= 1)
        path, line = culprit

        def at_culprit() -> list[dict[str, Any]]:
            return [
                attributes
                for _, event in self.events(kind)
                if (attributes := dict(event.attributes or {})).get("code.file.path") == path
                and attributes.get("code.line.number") == line
            ]

        with contextlib.suppress(AssertionError):  # the assertion below says what is missing
            wait_until(lambda: bool(at_culprit()))
        events = at_culprit()
        seen = [dict(event.attributes or {}) for _, event in self.events(kind)]
        assert events, f"no span event of {kind} at {path}:{line}: {seen}"
        lines = self.log_lines(kind)
        assert any(f"{path}:{line}" in text for text in lines), lines
        return events[0]

    def assert_silent(self, sentinel: Sentinel, kind: str) -> None:
        """No finding of *kind* anywhere: Sentinel, spans, logs, the metric on any route."""
        assert sentinel.findings(kind) == []
        assert self.events(kind) == []
        assert self.log_lines(kind) == []
        counted = [
            s.value
            for metric in self.registry.collect()
            for s in metric.samples
            if s.name == "asyncsentinel_findings_total" and s.labels.get("kind") == kind
        ]
        assert sum(counted) == 0, counted  # on no route at all


@pytest.fixture
def outputs(
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    spans: InMemorySpanExporter,
    finding_logs: pytest.LogCaptureFixture,
) -> Iterator[Outputs]:
    """The test's :class:`Outputs`; the Sentinels it instrumented are closed after the test."""
    outputs = Outputs(registry, tracer_provider, spans, finding_logs)
    yield outputs
    for sentinel in outputs.sentinels:
        sentinel.close()
