"""The loop's default executor (behind ``asyncio.to_thread``): queued work and busy threads.

When every worker of the default ``ThreadPoolExecutor`` is busy, ``asyncio.to_thread`` calls
queue up silently and the sync bridge becomes the bottleneck. Three gauges make that visible:
``asyncsentinel_thread_pool_queued_tasks``, ``_busy_threads`` and ``_max_threads``.

The executor is observed by wrapping ``submit`` on that one executor instance (restored on
shutdown); each work item is wrapped so the gauges move when it is queued, starts and ends.
asyncio exposes the default executor as ``loop._default_executor``; uvloop does not, so there
a one-off work item run through ``loop.run_in_executor(None, ...)`` reads which executor ran it.
The source checks every second (every ten seconds on uvloop) whether the application replaced
the default executor (``loop.set_default_executor``) and follows it.

Switch: ``thread_pool_metrics`` (``ASYNCSENTINEL_THREAD_POOL_METRICS=false``).
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from asyncsentinel.config import Settings
from asyncsentinel.findings import Dispatcher
from asyncsentinel.instruments import THREAD_POOL_BUSY, THREAD_POOL_MAX, THREAD_POOL_QUEUED
from asyncsentinel.sources import Source
from asyncsentinel.sources.tasks import on_loop_thread

_REFRESH_SECONDS = 1.0
_PROBE_EVERY = 10  # uvloop: a probe is a thread hop, so look for a new executor less often
_MISSING = object()


def _executor_running_this() -> ThreadPoolExecutor | None:
    """Run *inside* a worker: the executor that owns this thread (uvloop hides its default).

    ``concurrent.futures.thread._worker(executor_reference, ...)`` holds a weak reference to its
    executor; reading a local of a frame of the calling thread is safe.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_worker" and "executor_reference" in frame.f_code.co_varnames:
            ref = frame.f_locals.get("executor_reference")
            executor = ref() if callable(ref) else None
            return executor if isinstance(executor, ThreadPoolExecutor) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


class ObservedExecutor:
    """Counts queued and running work items of one ``ThreadPoolExecutor``."""

    def __init__(self, executor: ThreadPoolExecutor, dispatcher: Dispatcher) -> None:
        self.executor = executor
        self._dispatcher = dispatcher
        self._active = True
        self._original: Callable[..., Future[Any]] = executor.submit
        self._wrapper = self._make_submit()
        executor.submit = self._wrapper  # type: ignore[method-assign]
        max_workers = getattr(executor, "_max_workers", None)
        if isinstance(max_workers, int):
            dispatcher.set(THREAD_POOL_MAX, max_workers)

    def _make_submit(self) -> Callable[..., Future[Any]]:
        original, record = self._original, self._dispatcher.record

        @functools.wraps(original)
        def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
            if not self._active or fn is _executor_running_this:
                return original(fn, *args, **kwargs)
            started = False

            def run(*a: Any, **k: Any) -> Any:
                nonlocal started
                started = True
                record(THREAD_POOL_QUEUED, -1)
                record(THREAD_POOL_BUSY, 1)
                try:
                    return fn(*a, **k)
                finally:
                    record(THREAD_POOL_BUSY, -1)

            def dropped(future: Future[Any]) -> None:
                # Cancelled before a worker took it (shutdown(cancel_futures=True), .cancel()).
                if not started and future.cancelled():
                    record(THREAD_POOL_QUEUED, -1)

            record(THREAD_POOL_QUEUED, 1)
            try:
                future = original(run, *args, **kwargs)
            except BaseException:
                record(THREAD_POOL_QUEUED, -1)
                raise
            future.add_done_callback(dropped)
            return future

        return submit

    def close(self) -> None:
        """Stop counting; remove the wrapper unless someone wrapped it again meanwhile."""
        self._active = False
        if self.executor.__dict__.get("submit") is self._wrapper:
            del self.executor.submit


class ThreadPoolSource(Source):
    """Gauges for the loop's default executor (see the module docstring)."""

    name = "thread_pool"

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        super().__init__(settings, dispatcher)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observed: ObservedExecutor | None = None
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._probe: asyncio.Future[Any] | None = None
        self._refreshes = 0

    async def start(self) -> None:
        if self._loop is not None:
            return
        loop = self._loop = asyncio.get_running_loop()
        executor = getattr(loop, "_default_executor", _MISSING)
        if executor is None:
            # What asyncio would create on the first to_thread(); created now so the first
            # calls are counted too.
            executor = ThreadPoolExecutor(thread_name_prefix="asyncio")
            loop.set_default_executor(executor)
        elif executor is _MISSING:
            executor = await loop.run_in_executor(None, _executor_running_this)
        self._follow(executor)
        self._refresh_handle = loop.call_later(_REFRESH_SECONDS, self._refresh)

    async def stop(self) -> None:
        self._close()

    def uninstall(self) -> None:
        self._close()

    def _close(self) -> None:
        loop, self._loop = self._loop, None
        handle, self._refresh_handle = self._refresh_handle, None
        if loop is not None and handle is not None:
            on_loop_thread(loop, handle.cancel)
        if self._observed is not None:
            self._observed.close()
            self._observed = None

    def _follow(self, executor: object) -> None:
        """Observe *executor* if it is a ThreadPoolExecutor not observed yet."""
        current = self._observed.executor if self._observed is not None else None
        if executor is current or not isinstance(executor, ThreadPoolExecutor):
            return
        if self._observed is not None:
            self._observed.close()
        self._observed = ObservedExecutor(executor, self.dispatcher)

    def _refresh(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self._refreshes += 1
        try:
            executor = getattr(loop, "_default_executor", _MISSING)
            if executor is not _MISSING:
                self._follow(executor)
            elif self._refreshes % _PROBE_EVERY == 0 and (
                self._probe is None or self._probe.done()
            ):
                self._probe = loop.run_in_executor(None, _executor_running_this)
                self._probe.add_done_callback(self._probed)
        except Exception as exc:
            self.dispatcher.report_error("source.thread_pool", exc)
        self._refresh_handle = loop.call_later(_REFRESH_SECONDS, self._refresh)

    def _probed(self, future: asyncio.Future[Any]) -> None:
        if self._loop is not None and not future.cancelled() and future.exception() is None:
            self._follow(future.result())
