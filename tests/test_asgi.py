"""The pure-ASGI middleware: transparent to any traffic, exact metrics, bounded routes."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, BackgroundTasks, FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import asyncsentinel
from asyncsentinel import Sentinel, SentinelMiddleware
from asyncsentinel.context import OVERFLOW_ROUTE, UNMATCHED_ROUTE, current_request
from asyncsentinel.findings import Finding
from asyncsentinel.sources import Source
from tests.support import sample, serve

DURATION_COUNT = "http_server_request_duration_seconds_count"


def client(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, **kwargs), base_url="http://t")


# --- transparency -----------------------------------------------------------------------------
response_plans = st.fixed_dictionaries(
    {
        "status": st.integers(min_value=200, max_value=599),
        "headers": st.lists(
            st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=16)), max_size=4
        ),
        "chunks": st.lists(st.binary(max_size=64), max_size=5),
        "fail": st.sampled_from(["no", "before_start", "after_start"]),
        "read_body": st.booleans(),
        "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "BREW", "OPTIONS"]),
        "path": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30),
    }
)


class PlannedError(Exception):
    pass


def planned_app(plan: dict[str, Any]) -> Callable[..., Any]:
    """A raw ASGI app answering as the plan says (any status, headers, chunks, failures)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if plan["read_body"]:
            while (await receive()).get("more_body"):
                pass
        if plan["fail"] == "before_start":
            raise PlannedError("before start")
        await send(
            {"type": "http.response.start", "status": plan["status"], "headers": plan["headers"]}
        )
        for i, chunk in enumerate(plan["chunks"]):
            await send(
                {
                    "type": "http.response.body",
                    "body": chunk,
                    "more_body": i < len(plan["chunks"]) - 1,
                }
            )
        if plan["fail"] == "after_start":
            raise PlannedError("after start")
        if not plan["chunks"]:
            await send({"type": "http.response.body", "body": b""})

    return app


async def drive(app: Any, plan: dict[str, Any]) -> tuple[list[Any], str | None]:
    """Call an ASGI app once; return the messages it sent and the error it raised."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": plan["method"],
        "scheme": "http",
        "path": "/" + plan["path"],
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 5000),
    }
    incoming = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": False},
    ]
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    except PlannedError as exc:
        return sent, str(exc)
    return sent, None


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=response_plans)
def test_any_http_traffic_passes_through_unchanged(plan: dict[str, Any]) -> None:
    registry = CollectorRegistry()
    sentinel = Sentinel(
        registry=registry, loop_monitor=False, task_tracking=False, log_findings=False
    )
    try:
        bare = asyncio.run(drive(planned_app(plan), plan))
        wrapped_app = SentinelMiddleware(planned_app(plan), sentinel=sentinel)
        wrapped = asyncio.run(drive(wrapped_app, plan))
        assert wrapped == bare
        # Every request is counted exactly once, active requests return to zero.
        total = sum(
            s.value
            for m in registry.collect()
            if m.name == "http_server_request_duration_seconds"
            for s in m.samples
            if s.name == DURATION_COUNT
        )
        assert total == 1
        method = plan["method"] if plan["method"] != "BREW" else "_OTHER"
        assert sample(registry, "http_server_active_requests", http_request_method=method) == 0
        assert (
            sample(registry, "asyncsentinel_instrumentation_errors_total", component="middleware")
            == 0
        )
    finally:
        sentinel.close()


def _app_with_everything() -> Starlette:
    async def stream(request: Any) -> StreamingResponse:
        async def chunks() -> Any:
            for i in range(3):
                yield f"chunk{i};".encode()
                await asyncio.sleep(0)

        return StreamingResponse(chunks(), media_type="text/plain")

    async def boom(request: Any) -> PlainTextResponse:
        raise RuntimeError("handler failed")

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(text.upper())
        await websocket.close()

    return Starlette(
        routes=[
            Route("/stream", stream),
            Route("/boom", boom),
            WebSocketRoute("/ws", ws),
        ]
    )


async def test_streaming_background_tasks_and_errors_behave_as_without_middleware(
    make_sentinel: Callable[..., Sentinel],
    registry: CollectorRegistry,
) -> None:
    ran: list[str] = []
    app = FastAPI()

    @app.get("/with-background")
    async def with_background(background: BackgroundTasks) -> dict[str, str]:
        background.add_task(ran.append, "background ran")
        return {"ok": "yes"}

    app.mount("/other", _app_with_everything())
    sentinel = make_sentinel()
    app.add_middleware(SentinelMiddleware, sentinel=sentinel)
    async with client(app, raise_app_exceptions=False) as c:
        r = await c.get("/other/stream")
        assert r.text == "chunk0;chunk1;chunk2;"
        assert (await c.get("/with-background")).json() == {"ok": "yes"}
        assert ran == ["background ran"]
        assert (await c.get("/other/boom")).status_code == 500
    assert (
        sample(
            registry,
            DURATION_COUNT,
            http_request_method="GET",
            http_route="/other/stream",
            http_response_status_code="200",
        )
        == 1
    )
    assert (
        sample(
            registry,
            DURATION_COUNT,
            http_request_method="GET",
            http_route="/other/boom",
            http_response_status_code="500",
        )
        == 1
    )
    # The exception still reaches the application's error handling unchanged.
    async with client(app, raise_app_exceptions=True) as c:
        with pytest.raises(RuntimeError, match="handler failed"):
            await c.get("/other/boom")


async def test_websocket_passes_through(make_sentinel: Callable[..., Sentinel]) -> None:
    async def converse(app: Any) -> list[Any]:
        incoming = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hello"}]
        sent: list[Any] = []

        async def receive() -> Any:
            return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {
            "type": "websocket",
            "path": "/ws",
            "root_path": "",
            "headers": [],
            "query_string": b"",
            "scheme": "ws",
            "asgi": {"version": "3.0"},
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 5000),
            "subprotocols": [],
        }
        await app(scope, receive, send)
        return sent

    bare = await converse(_app_with_everything())
    wrapped = _app_with_everything()
    wrapped.add_middleware(SentinelMiddleware, sentinel=make_sentinel())
    assert await converse(wrapped) == bare
    assert {"type": "websocket.send", "text": "HELLO"} in bare


# --- routes ----------------------------------------------------------------------------------
async def test_route_is_the_template_never_the_raw_path(
    make_sentinel: Callable[..., Sentinel],
    registry: CollectorRegistry,
) -> None:
    app = FastAPI()
    seen: list[str | None] = []

    @app.get("/users/{user_id}")
    async def get_user(user_id: int) -> dict[str, int]:
        state = current_request()
        seen.append(state.route if state else None)

        async def child() -> str | None:
            inner = current_request()
            return inner.route if inner else None

        seen.append(await asyncio.create_task(child()))  # the context survives into tasks
        return {"id": user_id}

    api = APIRouter()

    @api.get("/items/{item_id}")
    async def get_item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    sub = FastAPI()
    sub.include_router(api)
    app.mount("/api", sub)
    app.add_middleware(SentinelMiddleware, sentinel=make_sentinel())
    async with client(app) as c:
        for i in range(3):
            assert (await c.get(f"/users/{i}")).status_code == 200
        assert (await c.get("/api/items/secret-token-123")).status_code == 200
        assert (await c.get("/no/such/path/12345")).status_code == 404
    assert seen == ["/users/{user_id}"] * 6
    assert (
        sample(
            registry,
            DURATION_COUNT,
            http_request_method="GET",
            http_route="/users/{user_id}",
            http_response_status_code="200",
        )
        == 3
    )
    assert (
        sample(
            registry,
            DURATION_COUNT,
            http_request_method="GET",
            http_route="/api/items/{item_id}",
            http_response_status_code="200",
        )
        == 1
    )
    assert (
        sample(
            registry,
            DURATION_COUNT,
            http_request_method="GET",
            http_route=UNMATCHED_ROUTE,
            http_response_status_code="404",
        )
        == 1
    )
    scrape = sentinel_scrape(registry)
    assert "secret-token-123" not in scrape and "12345" not in scrape


def sentinel_scrape(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    paths=st.lists(
        st.text(alphabet="abcdefgh", min_size=1, max_size=6), min_size=1, max_size=40, unique=True
    )
)
def test_distinct_routes_are_capped(paths: list[str]) -> None:
    registry = CollectorRegistry()
    sentinel = Sentinel(registry=registry, max_routes=5, loop_monitor=False, log_findings=False)

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route(f"/{p}", ok) for p in paths])
    app.add_middleware(SentinelMiddleware, sentinel=sentinel)

    async def hit_all() -> None:
        async with client(app) as c:
            for p in paths:
                await c.get(f"/{p}")

    try:
        asyncio.run(hit_all())
        routes = {
            s.labels["http_route"]
            for m in registry.collect()
            for s in m.samples
            if s.name == DURATION_COUNT
        }
        assert len(routes) <= 6  # five templates and the overflow value
        assert (OVERFLOW_ROUTE in routes) == (len(paths) > 5)
    finally:
        sentinel.close()


# --- metrics ---------------------------------------------------------------------------------
async def test_active_requests_counts_in_flight_requests(
    make_sentinel: Callable[..., Sentinel],
    registry: CollectorRegistry,
) -> None:
    app = FastAPI()
    entered = asyncio.Event()
    release = asyncio.Event()

    @app.post("/slow")
    async def slow() -> dict[str, str]:
        entered.set()
        await release.wait()
        return {}

    app.add_middleware(SentinelMiddleware, sentinel=make_sentinel())
    async with client(app) as c:
        task = asyncio.create_task(c.post("/slow"))
        await entered.wait()
        assert sample(registry, "http_server_active_requests", http_request_method="POST") == 1
        release.set()
        assert (await task).status_code == 200
    assert sample(registry, "http_server_active_requests", http_request_method="POST") == 0


def test_active_requests_stay_exact_when_requests_run_in_several_threads(
    make_sentinel: Callable[..., Sentinel],
    registry: CollectorRegistry,
) -> None:
    """Apps that run an event loop per thread start and end requests concurrently: the level
    must come back to exactly 0, never lose a start or an end, and never go below 0."""
    sentinel = make_sentinel(loop_monitor=False, sqlalchemy=False)
    scope = {"type": "http", "method": "PUT", "path": "/x", "root_path": ""}
    start = threading.Barrier(4)
    levels: list[float] = []

    def level() -> float:
        return sample(registry, "http_server_active_requests", http_request_method="PUT")

    def work() -> None:
        start.wait()
        for _ in range(3000):
            state = sentinel.begin_request(scope)
            assert state is not None
            sentinel.end_request(state, None)

    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    try:
        threads = [threading.Thread(target=work) for _ in range(3)]
        for thread in threads:
            thread.start()
        start.wait()
        while any(t.is_alive() for t in threads):
            levels.append(level())
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(saved)
    assert all(0 <= seen <= 3 for seen in levels), sorted(set(levels))
    assert level() == 0
    errors = sample(registry, "asyncsentinel_instrumentation_errors_total", component="middleware")
    assert errors == 0


async def test_metrics_endpoint_serves_the_registry(
    registry: CollectorRegistry,
    tracer_provider: Any,
) -> None:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> str:
        return "hi"

    sentinel = asyncsentinel.instrument(app, registry=registry, tracer_provider=tracer_provider)
    try:
        async with client(app) as c:
            await c.get("/hello")
            r = await c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert 'http_server_request_duration_seconds_count{http_request_method="GET",' in r.text
        assert "asyncsentinel_findings_total" in r.text
        assert (
            sample(
                registry,
                DURATION_COUNT,
                http_request_method="GET",
                http_route="/hello",
                http_response_status_code="200",
            )
            == 1
        )
    finally:
        sentinel.close()


async def test_metrics_path_can_be_moved_or_turned_off(
    make_sentinel: Callable[..., Sentinel],
) -> None:
    app = FastAPI()
    app.add_middleware(SentinelMiddleware, sentinel=make_sentinel(metrics_path="/internal/m"))
    off = FastAPI()
    off.add_middleware(SentinelMiddleware, sentinel=make_sentinel(metrics_path=None))
    async with client(app) as c:
        assert (await c.get("/internal/m")).status_code == 200
        assert (await c.get("/metrics")).status_code == 404
    async with client(off) as c:
        assert (await c.get("/metrics")).status_code == 404


# --- the two-line integration ---------------------------------------------------------------------
def test_instrument_twice_is_a_clear_error(registry: CollectorRegistry) -> None:
    app = FastAPI()
    sentinel = asyncsentinel.instrument(app, registry=registry)
    try:
        assert app.state.asyncsentinel is sentinel
        with pytest.raises(RuntimeError, match="already called on this application"):
            asyncsentinel.instrument(app, registry=registry)
    finally:
        sentinel.close()


def test_instrument_rejects_what_is_not_a_starlette_app() -> None:
    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(TypeError, match="SentinelMiddleware"):
        asyncsentinel.instrument(raw_app)


class LifecycleSource(Source):
    name = "lifecycle"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.events: list[str] = []

    async def start(self) -> None:
        self.events.append("start")

    async def stop(self) -> None:
        self.events.append("stop")


def test_lifespan_starts_and_stops_sources_under_uvicorn(
    make_sentinel: Callable[..., Sentinel],
) -> None:
    from contextlib import asynccontextmanager

    order: list[str] = []
    sentinel = make_sentinel()
    source = LifecycleSource(sentinel.settings, sentinel.dispatcher)
    sentinel.add_source(source)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        order.append("app startup")
        yield {"greeting": "hello"}
        order.append("app shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.get("/greeting")
    async def greeting(request: Request) -> str:
        return str(request.state.greeting)

    app.add_middleware(SentinelMiddleware, sentinel=sentinel)
    with serve(app) as base:
        assert httpx.get(f"{base}/greeting").json() == "hello"
        assert source.events == ["start"]
    assert source.events == ["start", "stop"]
    assert order == ["app startup", "app shutdown"]


# --- containment ----------------------------------------------------------------------------------
class BrokenSink:
    def emit(self, finding: Finding) -> None:
        raise ValueError("sink is broken")


class BrokenSource(Source):
    name = "broken"

    def request_finished(self, state: Any) -> None:
        raise KeyError("detector is broken")


async def test_internal_errors_are_contained_counted_and_logged_once(
    make_sentinel: Callable[..., Sentinel],
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncsentinel")
    sentinel = make_sentinel(sinks=[BrokenSink()])
    sentinel.add_source(BrokenSource(sentinel.settings, sentinel.dispatcher))
    app = FastAPI()

    @app.get("/work")
    async def work() -> dict[str, bool]:
        sentinel.report(Finding.create("slow_query", "a finding for the broken sink"))
        return {"ok": True}

    app.add_middleware(SentinelMiddleware, sentinel=sentinel)
    async with client(app) as c:
        for _ in range(3):
            r = await c.get("/work")
            assert r.status_code == 200 and r.json() == {"ok": True}
    assert (
        sample(registry, "asyncsentinel_instrumentation_errors_total", component="sink.BrokenSink")
        == 3
    )
    assert (
        sample(registry, "asyncsentinel_instrumentation_errors_total", component="source.broken")
        == 3
    )
    # The findings still reached the other sinks.
    assert (
        sample(registry, "asyncsentinel_findings_total", kind="slow_query", http_route="/work") == 3
    )
    errors = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(errors) == 2  # once per component
