"""The default executor behind asyncio.to_thread: queued work items, busy and maximum threads,
on asyncio (executor read from the loop) and uvloop (executor found from a worker thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import asyncsentinel
from asyncsentinel import Sentinel
from asyncsentinel.sources.threadpool import ThreadPoolSource
from tests.support import sample, serve, wait_for

LOOPS = ["asyncio", "uvloop"]
QUIET = {"sqlalchemy": False, "aiohttp": False, "log_rate_limit_seconds": 0}
QUEUED = "asyncsentinel_thread_pool_queued_tasks"
BUSY = "asyncsentinel_thread_pool_busy_threads"
MAX = "asyncsentinel_thread_pool_max_threads"


def pool_app(gate: threading.Event) -> FastAPI:
    app = FastAPI()
    app.state.calls = []

    @app.get("/submit/{n}")
    async def submit(n: int) -> dict[str, int]:
        app.state.calls.extend(
            asyncio.create_task(asyncio.to_thread(gate.wait, 30)) for _ in range(n)
        )
        await asyncio.sleep(0)
        return {"submitted": n}

    @app.get("/drain")
    async def drain() -> dict[str, int]:
        done = await asyncio.gather(*app.state.calls)
        app.state.calls.clear()
        return {"done": len(done)}

    return app


def gauges(registry: CollectorRegistry) -> tuple[float, float, float]:
    return sample(registry, QUEUED), sample(registry, BUSY), sample(registry, MAX)


@pytest.mark.e2e
@pytest.mark.parametrize("loop", LOOPS)
def test_saturated_default_executor_shows_queue_and_busy_threads(
    loop: str, registry: CollectorRegistry, sentinels: list[Sentinel]
) -> None:
    gate = threading.Event()
    app = pool_app(gate)
    sentinel = asyncsentinel.instrument(app, registry=registry, **QUIET)
    sentinels.append(sentinel)
    try:
        with serve(app, loop=loop) as base, httpx.Client(base_url=base, timeout=30) as client:
            max_threads = int(wait_for(lambda: sample(registry, MAX)))
            extra = 3
            client.get(f"/submit/{max_threads + extra}")
            assert wait_for(lambda: gauges(registry) == (extra, max_threads, max_threads))
            gate.set()
            assert client.get("/drain").json() == {"done": max_threads + extra}
            assert wait_for(lambda: gauges(registry)[:2] == (0, 0))
    finally:
        gate.set()


@pytest.mark.e2e
def test_executor_set_by_the_application_is_followed(
    registry: CollectorRegistry, sentinels: list[Sentinel]
) -> None:
    gate = threading.Event()
    app = pool_app(gate)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Set after asyncsentinel started: it notices within a second.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="app") as executor:
            asyncio.get_running_loop().set_default_executor(executor)
            yield

    app.router.lifespan_context = lifespan
    sentinel = asyncsentinel.instrument(app, registry=registry, **QUIET)
    sentinels.append(sentinel)
    try:
        with serve(app) as base, httpx.Client(base_url=base, timeout=30) as client:
            wait_for(lambda: sample(registry, MAX) == 2)
            client.get("/submit/5")
            assert wait_for(lambda: gauges(registry) == (3, 2, 2))
            gate.set()
            client.get("/drain")
            assert wait_for(lambda: gauges(registry)[:2] == (0, 0))
    finally:
        gate.set()


async def test_stop_restores_the_executor_and_counts_nothing_more(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry
) -> None:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=3)
    loop.set_default_executor(executor)
    sentinel = make_sentinel(**QUIET)
    source = sentinel.source("thread_pool")
    assert isinstance(source, ThreadPoolSource)
    await source.start()
    assert "submit" in executor.__dict__  # wrapped on this instance only
    assert sample(registry, MAX) == 3
    await asyncio.to_thread(time.sleep, 0)
    await source.stop()
    assert "submit" not in executor.__dict__
    started = threading.Event()
    release = threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    pending = asyncio.ensure_future(asyncio.to_thread(hold))
    await asyncio.to_thread(started.wait, 10)
    assert gauges(registry)[:2] == (0, 0)
    release.set()
    await pending
    await loop.shutdown_default_executor()


async def test_switched_off_thread_pool_metrics_install_nothing(
    make_sentinel: Callable[..., Sentinel],
) -> None:
    sentinel = make_sentinel(**QUIET, thread_pool_metrics=False)
    assert sentinel.source("thread_pool") is None
