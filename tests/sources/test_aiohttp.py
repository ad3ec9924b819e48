"""aiohttp client source: trace-config metrics and ClientSession life-cycle findings.

The upstream is a real ``aiohttp.web`` server on loopback (its own loop in a thread); the
application calling it is a real FastAPI app served by uvicorn (``tests.support.serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from fastapi import FastAPI, Request
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from asyncsentinel import (
    CLIENT_SESSION_PER_REQUEST,
    CLIENT_SESSION_UNCLOSED,
    Sentinel,
    SentinelMiddleware,
)
from asyncsentinel.sources.aiohttp_metrics import OVERFLOW_ADDRESS, ServerAddresses
from tests import support
from tests.support import free_port, sample, serve

HERE = str(Path(__file__).resolve())
DURATION_COUNT = "http_client_request_duration_seconds_count"
CONNECTIONS = "asyncsentinel_http_client_connections_total"
WAIT_COUNT = "http_client_connection_wait_time_seconds_count"
WAIT_SUM = "http_client_connection_wait_time_seconds_sum"
FINDINGS = "asyncsentinel_findings_total"
UNCLOSED_WARNING = "ignore:Unclosed client session:ResourceWarning"


def line_of(marker: str) -> int:
    """The line of this file carrying *marker* (so culprit assertions survive edits)."""
    return support.line_of(HERE, marker)


@contextlib.contextmanager
def upstream_server() -> Iterator[str]:
    """A real aiohttp.web server on 127.0.0.1, running on its own loop in a thread."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(text="slow")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    app = web.Application()
    app.router.add_route("*", "/ok", ok)
    app.router.add_get("/slow", slow)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/redirect", redirect)
    runner = web.AppRunner(app, access_log=None)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = free_port()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="aiohttp-upstream", daemon=True)
    thread.start()
    assert ready.wait(30), "upstream aiohttp server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with upstream_server() as url:
        yield url


def instrumented(app: FastAPI, sentinel: Sentinel) -> FastAPI:
    app.add_middleware(SentinelMiddleware, sentinel=sentinel)
    return app


def finding_count(registry: CollectorRegistry, kind: str, route: str) -> float:
    return sample(registry, FINDINGS, kind=kind, http_route=route)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gc.collect()  # a session in a reference cycle is finalised only by the collector
        time.sleep(0.02)
    return True


# --- trace config metrics ---------------------------------------------------------------------
def test_shared_session_counts_requests_and_reuses_one_connection(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry, upstream: str
) -> None:
    sentinel = make_sentinel()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.http = aiohttp.ClientSession(trace_configs=[sentinel.aiohttp_trace_config()])
        yield
        await app.state.http.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/proxy")
    async def proxy(request: Request) -> dict[str, str]:
        async with request.app.state.http.get(f"{upstream}/ok") as resp:
            return {"body": await resp.text()}

    with serve(instrumented(app, sentinel)) as base:
        for _ in range(5):
            assert httpx.get(f"{base}/proxy").json() == {"body": "ok"}

    labels = {"http_request_method": "GET", "server_address": "127.0.0.1"}
    assert sample(registry, DURATION_COUNT, **labels, http_response_status_code="200") == 5
    assert sample(registry, CONNECTIONS, server_address="127.0.0.1", state="created") == 1
    assert sample(registry, CONNECTIONS, server_address="127.0.0.1", state="reused") == 4
    # Healthy twin of both session findings: one session, created in the lifespan, closed there.
    assert sentinel.findings(CLIENT_SESSION_PER_REQUEST) == []
    assert sentinel.findings(CLIENT_SESSION_UNCLOSED) == []
    assert finding_count(registry, CLIENT_SESSION_PER_REQUEST, "/proxy") == 0


@pytest.mark.parametrize("limit", [1, 100])
def test_connector_limit_saturation_shows_as_connection_wait(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry, upstream: str, limit: int
) -> None:
    sentinel = make_sentinel()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=limit)
        trace = sentinel.aiohttp_trace_config()
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as http:
            app.state.http = http
            yield

    app = FastAPI(lifespan=lifespan)

    async def fetch(http: aiohttp.ClientSession) -> str:
        async with http.get(f"{upstream}/slow") as resp:
            return await resp.text()

    @app.get("/fanout")
    async def fanout(request: Request) -> list[str]:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(fetch(request.app.state.http)) for _ in range(3)]
        return [t.result() for t in tasks]

    with serve(instrumented(app, sentinel)) as base:
        assert httpx.get(f"{base}/fanout", timeout=30).json() == ["slow"] * 3

    labels = {"http_request_method": "GET", "server_address": "127.0.0.1"}
    assert sample(registry, DURATION_COUNT, **labels, http_response_status_code="200") == 3
    created = sample(registry, CONNECTIONS, server_address="127.0.0.1", state="created")
    reused = sample(registry, CONNECTIONS, server_address="127.0.0.1", state="reused")
    assert created + reused == 3
    if limit == 1:
        # Two of the three concurrent requests queued behind the single connection slot.
        assert sample(registry, WAIT_COUNT, server_address="127.0.0.1") >= 2
        assert sample(registry, WAIT_SUM, server_address="127.0.0.1") > 0
        assert created == 1
    else:
        assert sample(registry, WAIT_COUNT, server_address="127.0.0.1") == 0
        assert created == 3


async def test_status_codes_redirect_hops_failures_and_unknown_methods(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry, upstream: str
) -> None:
    sentinel = make_sentinel()
    refused = f"http://127.0.0.1:{free_port()}/"  # nothing listens there: connection refused
    async with aiohttp.ClientSession(trace_configs=[sentinel.aiohttp_trace_config()]) as http:
        async with http.get(f"{upstream}/status/503") as resp:
            assert resp.status == 503
        async with http.get(f"{upstream}/redirect") as resp:
            assert resp.status == 200
        async with http.request("PURGE", f"{upstream}/ok") as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(refused)

    def count(method: str, status: str) -> float:
        return sample(
            registry,
            DURATION_COUNT,
            http_request_method=method,
            server_address="127.0.0.1",
            http_response_status_code=status,
        )

    assert count("GET", "503") == 1
    assert count("GET", "302") == 1  # each redirect hop is one request
    assert count("GET", "200") == 1
    assert count("_OTHER", "200") == 1
    assert count("GET", "") == 1  # failed before any response: no status, still counted


async def test_request_timing_out_in_the_connector_queue_records_its_wait(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry, upstream: str
) -> None:
    sentinel = make_sentinel()
    connector = aiohttp.TCPConnector(limit=1)
    trace = sentinel.aiohttp_trace_config()

    async def fetch(http: aiohttp.ClientSession, timeout: float) -> str:
        try:
            async with http.get(f"{upstream}/slow", timeout=aiohttp.ClientTimeout(timeout)) as r:
                return await r.text()
        except TimeoutError:
            return "timed out"

    # The first task takes the only slot before the second runs; the second gives up
    # (0.05 s) long before the first releases the slot (0.2 s upstream delay).
    session = aiohttp.ClientSession(connector=connector, trace_configs=[trace])
    async with session as http, asyncio.TaskGroup() as tg:
        holder = tg.create_task(fetch(http, 30))
        queued = tg.create_task(fetch(http, 0.05))
    assert (holder.result(), queued.result()) == ("slow", "timed out")

    labels = {"http_request_method": "GET", "server_address": "127.0.0.1"}
    assert sample(registry, DURATION_COUNT, **labels, http_response_status_code="200") == 1
    assert sample(registry, DURATION_COUNT, **labels, http_response_status_code="") == 1
    assert sample(registry, WAIT_COUNT, server_address="127.0.0.1") == 1


async def test_dns_cache_hits_and_misses(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry, upstream: str
) -> None:
    sentinel = make_sentinel()
    port = upstream.rsplit(":", 1)[1]
    # force_close: every request opens a new connection, so every request resolves the host.
    connector = aiohttp.TCPConnector(force_close=True, family=socket.AF_INET, use_dns_cache=True)
    trace = sentinel.aiohttp_trace_config()
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as http:
        for _ in range(3):
            async with http.get(f"http://localhost:{port}/ok") as resp:
                assert await resp.text() == "ok"

    dns = "asyncsentinel_http_client_dns_cache_total"
    assert sample(registry, dns, result="miss") == 1
    assert sample(registry, dns, result="hit") == 2
    assert sample(registry, CONNECTIONS, server_address="localhost", state="created") == 3
    assert sample(registry, CONNECTIONS, server_address="localhost", state="reused") == 0


hostnames = st.text(max_size=12).filter(lambda host: host != OVERFLOW_ADDRESS)


@given(st.lists(hostnames, max_size=60), st.integers(min_value=1, max_value=20))
def test_server_address_labels_are_bounded_and_stable(hosts: list[str], limit: int) -> None:
    addresses = ServerAddresses(limit)
    first = [addresses(h) for h in hosts]
    assert [addresses(h) for h in hosts] == first  # stable for every host, seen or not
    kept = {label for label in first if label != OVERFLOW_ADDRESS}
    assert len(kept) <= limit
    distinct = list(dict.fromkeys(hosts))
    assert kept == set(distinct[:limit])  # the first hosts seen keep their names
    assert addresses(None) in ("", OVERFLOW_ADDRESS)


# --- client_session_per_request ------------------------------------------------------------------
def test_session_created_and_closed_in_request_is_reported_with_creation_line(
    make_sentinel: Callable[..., Sentinel],
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    spans: InMemorySpanExporter,
    finding_logs: pytest.LogCaptureFixture,
    upstream: str,
) -> None:
    sentinel = make_sentinel(server_span=True, tracer_provider=tracer_provider)
    app = FastAPI()

    @app.get("/per-request")
    async def per_request() -> dict[str, str]:
        async with aiohttp.ClientSession() as http:  # marker: per-request session
            resp = await http.get(f"{upstream}/ok")
            return {"body": await resp.text()}

    @app.get("/one-shot")
    async def one_shot() -> dict[str, str]:
        async with aiohttp.request("GET", f"{upstream}/ok") as resp:  # marker: one-shot
            return {"body": await resp.text()}

    with serve(instrumented(app, sentinel)) as base:
        for _ in range(2):
            assert httpx.get(f"{base}/per-request").json() == {"body": "ok"}
        assert httpx.get(f"{base}/one-shot").json() == {"body": "ok"}

    assert finding_count(registry, CLIENT_SESSION_PER_REQUEST, "/per-request") == 2
    assert finding_count(registry, CLIENT_SESSION_PER_REQUEST, "/one-shot") == 1
    assert finding_count(registry, CLIENT_SESSION_UNCLOSED, "/per-request") == 0
    expected = {
        "/per-request": line_of("# marker: per-request session"),
        "/one-shot": line_of("# marker: one-shot"),
    }
    for route, line in expected.items():
        (finding, *_) = sentinel.findings(CLIENT_SESSION_PER_REQUEST, http_route=route)
        assert finding.culprit is not None
        assert (finding.culprit.filename, finding.culprit.lineno) == (HERE, line)

        events = [
            (span, event)
            for span in spans.get_finished_spans()
            for event in span.events
            if event.name == "asyncsentinel.client_session_per_request"
            and (span.attributes or {}).get("http.route") == route
        ]
        assert events, f"no span event for {route}"
        for span, event in events:
            assert span.kind is SpanKind.SERVER
            attributes = event.attributes or {}
            assert attributes["code.file.path"] == HERE
            assert attributes["code.line.number"] == line

        logged = [
            r.getMessage()
            for r in finding_logs.records
            if r.name == "asyncsentinel" and "client_session_per_request" in r.getMessage()
        ]
        assert any(f"GET {route} at {HERE}:{line}" in text for text in logged), logged


def test_session_created_lazily_by_a_request_and_closed_at_shutdown_is_healthy(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry, upstream: str
) -> None:
    sentinel = make_sentinel()
    shared: list[aiohttp.ClientSession] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for http in shared:
            await http.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/lazy")
    async def lazy() -> dict[str, str]:
        if not shared:
            shared.append(aiohttp.ClientSession())
        async with shared[0].get(f"{upstream}/ok") as resp:
            return {"body": await resp.text()}

    with serve(instrumented(app, sentinel)) as base:
        for _ in range(3):
            assert httpx.get(f"{base}/lazy").json() == {"body": "ok"}

    assert shared[0].closed
    assert sentinel.findings(CLIENT_SESSION_PER_REQUEST) == []
    assert sentinel.findings(CLIENT_SESSION_UNCLOSED) == []
    assert finding_count(registry, CLIENT_SESSION_PER_REQUEST, "/lazy") == 0
    assert finding_count(registry, CLIENT_SESSION_UNCLOSED, "/lazy") == 0


# --- client_session_unclosed ---------------------------------------------------------------------
async def test_session_still_open_at_shutdown_is_reported(
    make_sentinel: Callable[..., Sentinel],
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
    spans: InMemorySpanExporter,
    finding_logs: pytest.LogCaptureFixture,
) -> None:
    sentinel = make_sentinel(server_span=True, tracer_provider=tracer_provider)
    forgotten: list[aiohttp.ClientSession] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        forgotten.append(aiohttp.ClientSession())  # marker: never closed
        yield  # the shutdown forgets to close it

    app = FastAPI(lifespan=lifespan)
    # A session open on another event loop (this test's) is not the application's business.
    elsewhere = aiohttp.ClientSession()
    try:
        with serve(instrumented(app, sentinel)) as base:
            assert httpx.get(f"{base}/metrics").status_code == 200
    finally:
        await elsewhere.close()

    line = line_of("# marker: never closed")
    (finding,) = sentinel.findings(CLIENT_SESSION_UNCLOSED)
    assert finding.evidence["detected_at"] == "shutdown"
    assert finding.http_route == ""
    assert finding.culprit is not None
    assert (finding.culprit.filename, finding.culprit.lineno) == (HERE, line)
    assert finding_count(registry, CLIENT_SESSION_UNCLOSED, "") == 1
    events = [
        event
        for span in spans.get_finished_spans()
        for event in span.events
        if event.name == "asyncsentinel.client_session_unclosed"
    ]
    assert [(e.attributes or {}).get("code.line.number") for e in events] == [line]
    assert any(
        f"client_session_unclosed on outside a request at {HERE}:{line}" in r.getMessage()
        for r in finding_logs.records
    )
    # Already reported: collecting it later must not report it a second time.
    forgotten[0].detach()  # its loop is gone; detaching is the only way to close it now
    forgotten.clear()
    gc.collect()
    assert finding_count(registry, CLIENT_SESSION_UNCLOSED, "") == 1


@pytest.mark.filterwarnings(UNCLOSED_WARNING)  # aiohttp's own warning about the same mistake
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_session_garbage_collected_unclosed_is_reported_with_its_route(
    make_sentinel: Callable[..., Sentinel],
    registry: CollectorRegistry,
    finding_logs: pytest.LogCaptureFixture,
    loop: str,
) -> None:
    sentinel = make_sentinel()
    app = FastAPI()

    @app.get("/leak")
    async def leak() -> dict[str, bool]:
        http = aiohttp.ClientSession()  # marker: dropped unclosed
        return {"closed": http.closed}

    with serve(instrumented(app, sentinel), loop=loop) as base:
        assert httpx.get(f"{base}/leak").json() == {"closed": False}
        assert wait_for(lambda: bool(sentinel.findings(CLIENT_SESSION_UNCLOSED)))

    line = line_of("# marker: dropped unclosed")
    (finding,) = sentinel.findings(CLIENT_SESSION_UNCLOSED)
    assert finding.evidence["detected_at"] == "garbage_collection"
    assert finding.culprit is not None
    assert (finding.culprit.filename, finding.culprit.lineno) == (HERE, line)
    assert finding_count(registry, CLIENT_SESSION_UNCLOSED, "/leak") == 1
    assert finding_count(registry, CLIENT_SESSION_PER_REQUEST, "/leak") == 0
    assert any(
        f"client_session_unclosed on GET /leak at {HERE}:{line}" in r.getMessage()
        for r in finding_logs.records
    )


# --- containment and clean removal ---------------------------------------------------------------
class BrokenSink:
    """A user-supplied sink that fails on everything."""

    def emit(self, finding: object) -> None:
        raise RuntimeError("sink down")

    def record(self, instrument: object, value: float, labels: tuple[str, ...]) -> None:
        raise RuntimeError("sink down")

    def set(self, instrument: object, value: float, labels: tuple[str, ...]) -> None:
        raise RuntimeError("sink down")


def test_failing_sink_never_reaches_the_application(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry, upstream: str
) -> None:
    sentinel = make_sentinel(sinks=[BrokenSink()])
    app = FastAPI()

    @app.get("/call")
    async def call() -> dict[str, str]:
        trace = sentinel.aiohttp_trace_config()
        async with aiohttp.ClientSession(trace_configs=[trace]) as http:
            resp = await http.get(f"{upstream}/ok")
            return {"body": await resp.text()}

    with serve(instrumented(app, sentinel)) as base:
        assert httpx.get(f"{base}/call").json() == {"body": "ok"}

    errors = "asyncsentinel_instrumentation_errors_total"
    assert sample(registry, errors, component="sink.BrokenSink") > 0
    # The other sinks still got everything.
    assert finding_count(registry, CLIENT_SESSION_PER_REQUEST, "/call") == 1


def test_close_restores_client_session_after_the_last_sentinel(
    make_sentinel: Callable[..., Sentinel],
) -> None:
    names = ("__init__", "close", "__del__")
    before = {name: aiohttp.ClientSession.__dict__[name] for name in names}
    first, second = make_sentinel(), make_sentinel()
    patched = {name: aiohttp.ClientSession.__dict__[name] for name in names}
    assert all(patched[name] is not before[name] for name in names)
    assert all(patched[name].__wrapped__ is before[name] for name in names)
    first.close()
    assert {name: aiohttp.ClientSession.__dict__[name] for name in names} == patched
    second.close()
    assert {name: aiohttp.ClientSession.__dict__[name] for name in names} == before


def test_trace_config_needs_the_source(make_sentinel: Callable[..., Sentinel]) -> None:
    sentinel = make_sentinel(aiohttp=False)
    assert sentinel.source("aiohttp") is None
    with pytest.raises(ValueError, match="aiohttp=True"):
        sentinel.aiohttp_trace_config()


def test_uninstalled_source_sees_no_sessions(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry
) -> None:
    sentinel = make_sentinel()
    sentinel.close()

    async def main() -> None:
        http = aiohttp.ClientSession()
        await http.close()

    asyncio.run(main())
    source: Any = sentinel.source("aiohttp")
    assert source._live == {}
