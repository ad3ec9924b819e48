"""Event-loop monitor: heartbeat lag, and blocked-loop incidents with the stack that blocked.

This module holds :class:`LoopMonitor`'s life cycle and its work on the loop thread, and
:class:`LoopSource`, which runs a monitor during the app's lifespan. The watchdog thread's work
is in :mod:`asyncsentinel.sources.loop_watchdog` (a mixin of the monitor), the judging of a
stall in :mod:`asyncsentinel.sources.loop_judge`.

Design (the one the field converged on): a heartbeat callback scheduled on the loop every
``loop_heartbeat_seconds`` records how late it ran (the lag histogram) and the loop thread's
scheduler statistics (one ``pread`` of ``/proc/thread-self/schedstat`` on Linux). A watchdog
thread sleeps until the next heartbeat is overdue; if the loop has still not run it, the watchdog
samples the loop thread's stack with ``sys._current_frames()`` *while the loop is blocked*,
several times during a long block. When the loop comes back, the incident is judged off the loop
and handed to it with ``call_soon_threadsafe`` (:meth:`LoopMonitor._emit` reports it): the
culprit is the innermost user-code frame of the dominant sample (the ``time.sleep``/``read``/CPU
loop line itself) and the request is the one whose task was running
(``asyncio.current_task(loop)`` read by the watchdog, then the task's context).

A block began after the latest moment the loop is known to have been alive: the previous
heartbeat or, when later, the start of the latest request (or the response end of the request
the blocking code runs for), both read by the watchdog while the loop is blocked. On a loop at
work a block is so timed to within a heartbeat interval at worst (25 ms at defaults), to a few
milliseconds when requests arrive, and never judged shorter than it was.

What is not the running line's doing is told apart and never blamed on it: garbage collection
(``gc.callbacks``), time the loop thread was runnable but the host gave it no CPU (Linux
scheduler statistics over the whole block), the executor starting a worker thread, and blocks
with no application frame on the stack. Those are measured in
``asyncsentinel_event_loop_blocked_seconds``; only blocks whose remaining time reaches
``loop_block_seconds`` become ``event_loop_blocked`` findings.

Cost: nothing runs per callback, so it works on any loop (asyncio, uvloop; no ``Handle._run``
patching) at a cost independent of request rate. An idle loop beats four times less often (a
request wakes it back to the configured rate at once): measured at 0.27-0.31 % of one core at
idle (``benchmarks/loop_overhead.py``), most of it the cost of waking the two threads; the
watchdog sleeps on an ``Event`` and wakes only when a heartbeat is overdue.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import threading
import time
from collections import deque
from types import FrameType
from typing import TYPE_CHECKING

from asyncsentinel.config import Settings
from asyncsentinel.context import RequestState
from asyncsentinel.findings import EVENT_LOOP_BLOCKED, Dispatcher, Finding, Severity
from asyncsentinel.instruments import EVENT_LOOP_BLOCKED as BLOCKED_SECONDS
from asyncsentinel.instruments import EVENT_LOOP_LAG
from asyncsentinel.sources import Source
from asyncsentinel.sources._task_requests import (
    HAS_TASK_CONTEXT,
    bind_root_task,
    unbind_root_task,
)
from asyncsentinel.sources.loop_judge import (
    LateBeat,
    Verdict,
    message,
    open_schedstat,
    read_schedstat,
)
from asyncsentinel.sources.loop_watchdog import Beat, LoopWatchdog

if TYPE_CHECKING:
    from asyncsentinel.sentinel import Sentinel

# The clock of RequestState.start_ns, so a request's start bounds a block's start.
_clock = time.perf_counter_ns
_IDLE_BEATS = 4  # an idle loop beats every 4 heartbeat intervals (at most the threshold)
_IDLE_CPU_SHARE = 100  # the loop thread used under 1/100 of the time since the last beat: idle
_LAG_BATCH = 32  # lag samples recorded together
_DEPTH_EVERY = 64  # beats between two measurements of the loop's dispatch depth


class LoopMonitor(LoopWatchdog):
    """Watches one event loop: heartbeat lag and blocked-loop incidents with the blocking stack.

    With :func:`asyncsentinel.instrument` it is started and stopped by the app's lifespan.
    Standalone (a worker, a script, a non-ASGI server)::

        async with asyncsentinel.LoopMonitor(sentinel, block_seconds=0.1):
            await main()

    or ``monitor.start()`` / ``monitor.stop()``. *sentinel* is a :class:`~asyncsentinel.Sentinel`
    (findings go to its sinks and thresholds default to its settings), a
    :class:`~asyncsentinel.findings.Dispatcher`, or ``None`` for a Sentinel with default options
    (default Prometheus registry, the ``asyncsentinel`` logger, the global tracer provider) and
    its other detectors off. Thresholds come from *settings* (default: the Sentinel's, or
    ``ASYNCSENTINEL_*`` variables for a Dispatcher); ``block_seconds`` and ``heartbeat_seconds``
    override ``loop_block_seconds`` and ``loop_heartbeat_seconds``.
    """

    def __init__(
        self,
        sentinel: Sentinel | Dispatcher | None = None,
        *,
        block_seconds: float | None = None,
        heartbeat_seconds: float | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.sentinel: Sentinel | None
        if sentinel is None:
            from asyncsentinel.sentinel import Sentinel

            sentinel = Sentinel(
                sqlalchemy=False,
                loop_monitor=False,
                task_tracking=False,
                thread_pool_metrics=False,
                aiohttp=False,
            )
        if isinstance(sentinel, Dispatcher):
            self.sentinel, dispatcher = None, sentinel
            settings = settings if settings is not None else Settings.load()
        else:
            self.sentinel, dispatcher = sentinel, sentinel.dispatcher
            settings = settings if settings is not None else sentinel.settings
        changes: dict[str, float] = {}
        if block_seconds is not None:
            changes["loop_block_seconds"] = block_seconds
        if heartbeat_seconds is not None:
            changes["loop_heartbeat_seconds"] = heartbeat_seconds
        settings = settings.replace(**changes) if changes else settings
        self.block_seconds = settings.loop_block_seconds
        self.heartbeat_seconds = settings.loop_heartbeat_seconds
        self._dispatcher = dispatcher
        self._interval_ns = int(self.heartbeat_seconds * 1e9)
        self._threshold_ns = int(self.block_seconds * 1e9)
        self._idle_interval_ns = max(
            self._interval_ns, min(_IDLE_BEATS * self._interval_ns, self._threshold_ns)
        )
        # Start sampling at half the threshold so blocks just over it are still seen in the act.
        self._early_ns = self._threshold_ns // 2
        self._sample_interval = max(0.005, min(0.05, self.block_seconds / 2))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()  # stop, or the loop left idle mode
        self._stop_requested = False
        self._idle = False
        self._beat: Beat | None = None
        # Recent late heartbeats, appended by the loop, read by the watchdog (deque appends and
        # copies are atomic); a few, so a watchdog that wakes late still finds the one it needs.
        self._lates: deque[LateBeat] = deque(maxlen=16)
        self._loop_thread_id = 0
        self._dispatch_depth = 0  # stack depth at which the loop dispatches callbacks
        self._paused_seq = -1
        self._gc_started_ns = 0
        self._gc_total_ns = 0
        self._schedstat_fd = -1
        self._alive_ns = 0  # latest request start on this loop (the RequestState clock)
        self._lags: list[float] = []

    # --- life cycle ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._loop is not None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start watching *loop* (default: the running loop); callable from any thread."""
        if self._loop is not None:
            return
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._stop_requested = False
        self._wake.clear()
        self._beat = None
        self._alive_ns = 0
        self._lates.clear()
        gc.callbacks.append(self._on_gc)
        self._loop.call_soon_threadsafe(self._heartbeat)
        self._thread = threading.Thread(
            target=self._watch, name="asyncsentinel-loop-watchdog", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat and the watchdog; callable from any thread, idempotent."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        self._stop_requested = True
        self._wake.set()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        handle, self._handle = self._handle, None
        fd, self._schedstat_fd = self._schedstat_fd, -1

        def release() -> None:
            self._flush_lags()
            if handle is not None:
                handle.cancel()
            if fd >= 0:
                os.close(fd)

        # On the loop, so a heartbeat never reads a closed (or reused) descriptor; the heartbeat
        # also stops rescheduling itself once _loop is None.
        if self._loop_thread_id == threading.get_ident() or not loop.is_running():
            release()
        else:
            try:
                loop.call_soon_threadsafe(release)
            except RuntimeError:  # the loop closed meanwhile
                release()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    async def __aenter__(self) -> LoopMonitor:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()

    # --- on the loop thread -----------------------------------------------------------------------
    def _heartbeat(self) -> None:
        # Kept to a few cheap calls: it runs 10-40 times a second on the application's loop,
        # mostly on a thread that just woke up with cold caches.
        loop = self._loop
        if loop is None:
            return
        prev = self._beat
        if prev is None:
            self._loop_thread_id = threading.get_ident()
            self._schedstat_fd = open_schedstat()
        now = _clock()
        cpu, wait = self._cpu_and_wait()
        gc_total = self._gc_total_ns
        if prev is not None:
            lag = now - prev.next_due_ns
            paused = prev.seq == self._paused_seq
            if lag >= self._early_ns:
                # Published before the new beat, so a watchdog that sees the beat sees this too;
                # woken so the incident is judged now, not after its next sampling pause.
                self._lates.append(
                    LateBeat(
                        prev.seq + 1,
                        prev.ran_ns,
                        prev.next_due_ns,
                        now,
                        cpu - prev.cpu_ns,
                        wait - prev.wait_ns if wait >= 0 and prev.wait_ns >= 0 else None,
                        gc_total - prev.gc_ns,
                        paused,
                    )
                )
                self._wake.set()
            if not paused:
                self._lags.append(max(lag, 0) / 1e9)
            if len(self._lags) >= _LAG_BATCH or lag >= self._early_ns:
                self._flush_lags()
            idle = (cpu - prev.cpu_ns) * _IDLE_CPU_SHARE < now - prev.ran_ns
        else:
            idle = False
        seq = prev.seq + 1 if prev is not None else 0
        if seq % _DEPTH_EVERY == 0:
            depth = 0
            frame: FrameType | None = sys._getframe(1)  # the frame that called this callback
            while frame is not None:
                depth += 1
                frame = frame.f_back
            self._dispatch_depth = depth
        # An idle loop (its thread used under 1% of a CPU since the last beat) beats less often:
        # each wake of a sleeping thread costs ~0.1 ms of CPU, which at 40 Hz would be the
        # monitor's whole idle budget. A loop that is serving anything beats as configured.
        self._idle = idle
        interval_ns = self._idle_interval_ns if idle else self._interval_ns
        self._beat = Beat(seq, now, now + interval_ns, cpu, wait, gc_total)
        self._handle = loop.call_later(interval_ns / 1e9, self._heartbeat)

    def _cpu_and_wait(self) -> tuple[int, int]:
        """The loop thread's CPU time and run-queue wait so far (ns; wait -1 when unknown)."""
        sched = read_schedstat(self._schedstat_fd)
        if sched is None:
            return time.thread_time_ns(), -1
        return sched

    def _activity(self) -> None:
        """Work arrived (a request started): leave idle mode now rather than at the next beat.

        Called on the loop thread; costs one attribute test unless the loop was idle. The
        loop is alive right now, so this counts as a heartbeat; the watchdog is woken to take
        the nearer deadline.
        """
        loop, prev = self._loop, self._beat
        if not self._idle or loop is None or prev is None:
            return
        self._idle = False
        if self._handle is not None:
            self._handle.cancel()
        now = _clock()
        cpu, wait = self._cpu_and_wait()
        self._beat = Beat(prev.seq + 1, now, now + self._interval_ns, cpu, wait, self._gc_total_ns)
        self._handle = loop.call_later(self.heartbeat_seconds, self._heartbeat)
        self._wake.set()

    def _flush_lags(self) -> None:
        """Record the buffered lags: one burst of warm histogram updates instead of many cold."""
        lags, self._lags = self._lags, []
        for lag in lags:
            self._dispatcher.record(EVENT_LOOP_LAG, lag)

    def _emit(self, verdict: Verdict) -> None:
        try:
            route = verdict.request.route if verdict.request is not None else ""
            self._dispatcher.record(BLOCKED_SECONDS, verdict.blocked_seconds, (route,))
            if not verdict.finding:
                return
            self._dispatcher.emit(
                Finding.create(
                    EVENT_LOOP_BLOCKED,
                    message(verdict),
                    severity=Severity.WARNING,
                    culprit=verdict.culprit,
                    stack=verdict.stack,
                    evidence=verdict.evidence,
                    request=verdict.request,
                )
            )
        except Exception as exc:
            self._dispatcher.report_error("source.loop", exc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        # Runs in whichever thread collects; a collection holds the GIL, so it stalls the loop
        # thread too. Two integer updates: cheap enough for every gen-0 collection.
        if phase == "start":
            self._gc_started_ns = _clock()
        elif self._gc_started_ns:
            self._gc_total_ns += _clock() - self._gc_started_ns
            self._gc_started_ns = 0


class LoopSource(Source):
    """Runs a :class:`LoopMonitor` on the application's loop during its lifespan.

    Switch: ``loop_monitor`` (``ASYNCSENTINEL_LOOP_MONITOR=false`` turns it off); thresholds
    ``loop_block_seconds`` and ``loop_heartbeat_seconds``.
    """

    name = "loop"

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        super().__init__(settings, dispatcher)
        self.monitor: LoopMonitor | None = None

    async def start(self) -> None:
        if self.monitor is None:
            self.monitor = LoopMonitor(self.dispatcher, settings=self.settings)
        self.monitor.start()

    async def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()

    def uninstall(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()

    def request_started(self, state: RequestState) -> None:
        monitor = self.monitor
        if monitor is not None and monitor._loop_thread_id == threading.get_ident():
            # The loop is alive now: a block that follows began after this (one store, read by
            # the watchdog only while the loop is blocked). Only from the monitored loop's
            # thread: a request on another loop says nothing about this one.
            monitor._alive_ns = state.start_ns
            if monitor._idle:
                monitor._activity()
        if not HAS_TASK_CONTEXT:
            # Python 3.11 cannot read a task's context, so the watchdog needs to be told which
            # task runs each request (one dict write per request; 3.12+ reads the context).
            task = asyncio.current_task()
            if task is not None:
                state.extras["_loop_task"] = task
                bind_root_task(task, state)

    if not HAS_TASK_CONTEXT:

        def request_finished(self, state: RequestState) -> None:
            task = state.extras.pop("_loop_task", None)
            if task is not None:
                unbind_root_task(task, state)
