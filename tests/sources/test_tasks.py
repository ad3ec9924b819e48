"""Task tracking: leaked fire-and-forget tasks, swallowed cancellation, unretrieved exceptions,
the live-task gauge, and chaining with the application's task factory and exception handler.

End-to-end through a real uvicorn server (asyncio and uvloop); the chaining tests run a real
event loop directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.background import BackgroundTask

import asyncsentinel
from asyncsentinel import (
    CANCELLATION_SWALLOWED,
    TASK_EXCEPTION_UNRETRIEVED,
    TASK_LEAKED,
    Finding,
    Sentinel,
)
from asyncsentinel.sources.tasks import TaskSource
from tests import support
from tests.support import sample, serve, wait_for

THIS_FILE = os.path.abspath(__file__)
LOOPS = ["asyncio", "uvloop"]
QUIET = {"sqlalchemy": False, "aiohttp": False, "log_rate_limit_seconds": 0}
TASK_KINDS = (TASK_LEAKED, CANCELLATION_SWALLOWED, TASK_EXCEPTION_UNRETRIEVED)


def line_of(marker: str) -> int:
    """Line number of the statement tagged ``# <marker>`` in this file."""
    return support.line_of(THIS_FILE, f"# {marker}")


async def linger() -> None:
    await asyncio.sleep(30)  # LINGER


async def stubborn() -> str:  # SWALLOWER
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return "ignored the cancel"
    return "finished"


async def polite() -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        await asyncio.sleep(0)  # cleanup, then let the cancellation through
        raise


async def explode() -> None:
    await asyncio.sleep(0)
    raise ValueError(f"user data {id(asyncio)}")  # RAISER


def task_app() -> FastAPI:
    app = FastAPI()
    app.state.keep = []
    app.state.handled = []

    @app.get("/fire-and-forget")
    async def fire_and_forget() -> dict[str, str]:
        app.state.keep.append(asyncio.create_task(linger()))  # LEAKED
        return {"ok": "sent"}

    @app.get("/swallow")
    async def swallow() -> dict[str, str]:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0.01)
        task.cancel()
        return {"result": await task}

    @app.get("/lost")
    async def lost() -> dict[str, str]:
        asyncio.create_task(explode())  # noqa: RUF006 - the mistake under test
        await asyncio.sleep(0.05)
        return {"ok": "lost"}

    @app.get("/spawn")
    async def spawn() -> dict[str, int]:
        release = asyncio.Event()
        app.state.release = release
        app.state.keep.extend(asyncio.create_task(release.wait()) for _ in range(25))
        return {"spawned": 25}

    @app.get("/release")
    async def release() -> dict[str, str]:
        app.state.release.set()
        return {"ok": "released"}

    # --- healthy twins ----------------------------------------------------------------------
    @app.get("/awaited")
    async def awaited() -> dict[str, str]:
        task = asyncio.create_task(asyncio.sleep(0.05))
        await task
        return {"ok": "awaited"}

    @app.get("/taskgroup-timeout")
    async def taskgroup_timeout() -> dict[str, str]:
        try:
            async with asyncio.timeout(0.05), asyncio.TaskGroup() as tg:
                tg.create_task(linger())
                tg.create_task(polite())
        except TimeoutError:
            return {"ok": "timed out"}
        return {"ok": "finished"}

    @app.get("/taskgroup-failure")
    async def taskgroup_failure() -> dict[str, str]:
        outcome = "finished"
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(linger())
                tg.create_task(explode())
        except* ValueError:
            outcome = "handled"
        return {"ok": outcome}

    @app.get("/taskgroup-in-task")
    async def taskgroup_in_task() -> dict[str, str]:
        async def host() -> str:
            outcome = "finished"
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(explode())  # fails while host() waits in __aexit__
            except* ValueError:
                outcome = "handled"
            return outcome

        return {"ok": await asyncio.create_task(host())}

    @app.get("/cancel-properly")
    async def cancel_properly() -> dict[str, str]:
        task = asyncio.create_task(polite())
        await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return {"ok": "cancelled"}

    @app.get("/retrieved")
    async def retrieved() -> dict[str, str]:
        task = asyncio.create_task(explode())
        await asyncio.wait([task])
        return {"error": str(task.exception())}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0.01)
                yield f"{i}\n".encode()

        return StreamingResponse(chunks())

    @app.get("/background")
    async def background() -> JSONResponse:
        # Starlette runs it after the response, within the request: not a leak.
        return JSONResponse({"ok": "background"}, background=BackgroundTask(asyncio.sleep, 0.05))

    return app


def instrumented(
    app: FastAPI, registry: CollectorRegistry, tracer_provider: Any, **options: Any
) -> Sentinel:
    return asyncsentinel.instrument(
        app,
        registry=registry,
        tracer_provider=tracer_provider,
        server_span=True,
        **{**QUIET, "task_leak_seconds": 0.3, **options},
    )


def events_named(exporter: InMemorySpanExporter, name: str) -> list[Any]:
    return [e for s in exporter.get_finished_spans() for e in s.events if e.name == name]


@pytest.mark.e2e
@pytest.mark.parametrize("loop", LOOPS)
def test_fire_and_forget_task_is_reported_at_its_creation_line(
    loop: str,
    registry: CollectorRegistry,
    tracer_provider: Any,
    spans: InMemorySpanExporter,
    finding_logs: pytest.LogCaptureFixture,
    sentinels: list[Sentinel],
) -> None:
    app = task_app()
    sentinel = instrumented(app, registry, tracer_provider)
    sentinels.append(sentinel)
    with serve(app, loop=loop) as base:
        assert httpx.get(f"{base}/fire-and-forget", timeout=30).status_code == 200
        [finding] = wait_for(lambda: sentinel.findings(TASK_LEAKED))
    line = line_of("LEAKED")
    assert finding.culprit is not None
    assert (finding.culprit.filename, finding.culprit.lineno) == (THIS_FILE, line)
    assert finding.http_route == "/fire-and-forget"
    assert finding.evidence["tasks"] == 1
    assert finding.evidence["coroutine"] == "linger"
    assert finding.evidence["created_with"] == "create_task"
    assert str(finding.evidence["awaiting_at"]).startswith(f"{THIS_FILE}:{line_of('LINGER')}")
    assert (
        sample(
            registry,
            "asyncsentinel_findings_total",
            kind=TASK_LEAKED,
            http_route="/fire-and-forget",
        )
        == 1
    )
    [event] = events_named(spans, "asyncsentinel.task_leaked")
    assert event.attributes["code.line.number"] == line
    assert event.attributes["code.file.path"] == THIS_FILE
    text = "\n".join(r.getMessage() for r in finding_logs.records)
    assert f"task_leaked on GET /fire-and-forget at {THIS_FILE}:{line}" in text
    assert "app.state.keep.append(asyncio.create_task(linger()))" in text


@pytest.mark.e2e
@pytest.mark.parametrize("loop", LOOPS)
def test_swallowed_cancellation_is_reported_at_the_coroutine(
    loop: str,
    registry: CollectorRegistry,
    tracer_provider: Any,
    spans: InMemorySpanExporter,
    finding_logs: pytest.LogCaptureFixture,
    sentinels: list[Sentinel],
) -> None:
    app = task_app()
    sentinel = instrumented(app, registry, tracer_provider)
    sentinels.append(sentinel)
    with serve(app, loop=loop) as base:
        response = httpx.get(f"{base}/swallow", timeout=30)
        assert response.json() == {"result": "ignored the cancel"}
        [finding] = wait_for(lambda: sentinel.findings(CANCELLATION_SWALLOWED))
    line = line_of("SWALLOWER")
    assert finding.culprit is not None
    assert (finding.culprit.filename, finding.culprit.lineno) == (THIS_FILE, line)
    assert finding.culprit.function == "stubborn"
    assert finding.http_route == "/swallow"
    assert finding.evidence["cancel_requests"] == 1
    assert (
        sample(
            registry,
            "asyncsentinel_findings_total",
            kind=CANCELLATION_SWALLOWED,
            http_route="/swallow",
        )
        == 1
    )
    [event] = events_named(spans, "asyncsentinel.cancellation_swallowed")
    assert event.attributes["code.line.number"] == line
    text = "\n".join(r.getMessage() for r in finding_logs.records)
    assert f"cancellation_swallowed on GET /swallow at {THIS_FILE}:{line} in stubborn" in text


@pytest.mark.e2e
@pytest.mark.parametrize("loop", LOOPS)
def test_unretrieved_task_exception_is_reported_and_the_apps_handler_still_runs(
    loop: str,
    registry: CollectorRegistry,
    tracer_provider: Any,
    finding_logs: pytest.LogCaptureFixture,
    sentinels: list[Sentinel],
) -> None:
    app = task_app()
    handled: list[dict[str, Any]] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The application installs its own handler during start-up, after asyncsentinel's.
        loop_ = asyncio.get_running_loop()
        app.state.loop = loop_
        loop_.set_exception_handler(lambda _loop, context: handled.append(context))
        yield

    app.router.lifespan_context = lifespan
    sentinel = instrumented(app, registry, tracer_provider)
    sentinels.append(sentinel)
    tasks = sentinel.source("tasks")
    assert isinstance(tasks, TaskSource)
    with serve(app, loop=loop) as base:
        # asyncsentinel re-chains itself in front of the application's handler.
        wait_for(lambda: app.state.loop.get_exception_handler() == tasks._exception_handler)
        assert httpx.get(f"{base}/lost", timeout=30).status_code == 200

        def reported() -> list[Finding]:
            gc.collect()  # the "never retrieved" event fires when the task is collected
            return sentinel.findings(TASK_EXCEPTION_UNRETRIEVED)

        [finding] = wait_for(reported)
    line = line_of("RAISER")
    assert finding.culprit is not None
    assert (finding.culprit.filename, finding.culprit.lineno) == (THIS_FILE, line)
    assert finding.evidence["exception_type"] == "ValueError"
    assert finding.http_route == "/lost"
    assert "user data" not in finding.message  # the exception text (user data) is not copied
    # The application's own handler saw the same event.
    assert [c["message"] for c in handled] == ["Task exception was never retrieved"]
    text = "\n".join(r.getMessage() for r in finding_logs.records)
    assert f"task_exception_unretrieved on GET /lost at {THIS_FILE}:{line} in explode" in text


@pytest.mark.e2e
@pytest.mark.parametrize("loop", LOOPS)
def test_healthy_task_patterns_under_concurrent_load_report_nothing(
    loop: str, registry: CollectorRegistry, tracer_provider: Any, sentinels: list[Sentinel]
) -> None:
    app = task_app()
    sentinel = instrumented(app, registry, tracer_provider, task_leak_seconds=0.2)
    sentinels.append(sentinel)
    routes = [
        "/awaited",
        "/taskgroup-timeout",
        "/taskgroup-failure",
        "/taskgroup-in-task",
        "/cancel-properly",
        "/retrieved",
        "/stream",
        "/background",
    ]

    async def load(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for _ in range(3):
                responses = await asyncio.gather(*(client.get(r) for r in routes for _ in range(5)))
                assert all(r.status_code == 200 for r in responses), responses

    with serve(app, loop=loop) as base:
        asyncio.run(load(base))
        time.sleep(0.5)  # past task_leak_seconds: the leak checks have run
        gc.collect()
        assert sample(registry, "asyncsentinel_asyncio_tasks") > 0  # tracking was on
    assert [f for f in sentinel.findings() if f.kind in TASK_KINDS] == []


@pytest.mark.e2e
def test_live_task_gauge_follows_the_tasks(
    registry: CollectorRegistry, tracer_provider: Any, sentinels: list[Sentinel]
) -> None:
    app = task_app()
    sentinel = instrumented(app, registry, tracer_provider, task_leak_seconds=60)
    sentinels.append(sentinel)
    with serve(app) as base:
        before = wait_for(lambda: sample(registry, "asyncsentinel_asyncio_tasks"))
        httpx.get(f"{base}/spawn", timeout=30)
        wait_for(lambda: sample(registry, "asyncsentinel_asyncio_tasks") >= before + 25)
        httpx.get(f"{base}/release", timeout=30)
        wait_for(lambda: sample(registry, "asyncsentinel_asyncio_tasks") < before + 25)


# --- chaining on a real loop, without a server -------------------------------------------------
async def test_factory_is_chained_with_the_existing_one_and_restored(
    make_sentinel: Callable[..., Sentinel],
) -> None:
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def users_factory(loop_: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        made.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop_, **kwargs)

    loop.set_task_factory(users_factory)
    try:
        sentinel = make_sentinel(**QUIET, task_leak_seconds=0.1)
        source = sentinel.source("tasks")
        assert isinstance(source, TaskSource)
        await source.start()
        assert loop.get_task_factory() == source._factory
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0.01)
        task.cancel()
        assert await task == "ignored the cancel"
        await asyncio.sleep(0.01)  # done callbacks run on the next iteration
        assert made == ["stubborn"]  # the user's factory still made the task
        [finding] = sentinel.findings(CANCELLATION_SWALLOWED)
        assert finding.http_route == ""  # outside any request
        await source.stop()
        assert loop.get_task_factory() is users_factory
        await asyncio.create_task(asyncio.sleep(0))
        assert made == ["stubborn", "sleep"]
    finally:
        loop.set_task_factory(None)


async def test_switched_off_tracking_installs_nothing(
    make_sentinel: Callable[..., Sentinel],
) -> None:
    sentinel = make_sentinel(**QUIET, task_tracking=False)
    await sentinel.startup()
    try:
        assert sentinel.source("tasks") is None
        loop = asyncio.get_running_loop()
        assert loop.get_task_factory() is None
        assert loop.get_exception_handler() is None
    finally:
        await sentinel.shutdown()


async def test_two_sentinels_on_one_loop_do_not_chain_in_a_circle(
    make_sentinel: Callable[..., Sentinel],
) -> None:
    loop = asyncio.get_running_loop()
    first = make_sentinel(**QUIET).source("tasks")
    second = make_sentinel(**QUIET).source("tasks")
    assert isinstance(first, TaskSource) and isinstance(second, TaskSource)
    await first.start()
    await second.start()
    try:
        first._rechain(loop)
        second._rechain(loop)
        assert loop.get_task_factory() == second._factory
        assert second._previous_factory == first._factory
        assert first._previous_factory is None
        assert await asyncio.create_task(asyncio.sleep(0, "ok")) == "ok"
    finally:
        await second.stop()
        await first.stop()
    assert loop.get_task_factory() is None
    assert loop.get_exception_handler() is None
