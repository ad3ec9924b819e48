"""Event-loop monitor: heartbeat lag, and blocked-loop incidents with the stack that blocked.

Design (the one the field converged on): a heartbeat callback scheduled on the loop every
``loop_heartbeat_seconds`` records how late it ran (the lag histogram). A watchdog thread sleeps
until the next heartbeat is overdue; if the loop has still not run it, the watchdog samples the
loop thread's stack with ``sys._current_frames()`` *while the loop is blocked*, several times
during a long block. When the loop comes back, the incident is judged off the loop and handed to
it with ``call_soon_threadsafe``: the culprit is the innermost user-code frame of the dominant
sample (the ``time.sleep``/``read``/CPU-loop line itself) and the request is the one whose task
was running (``asyncio.current_task(loop)`` read by the watchdog, then the task's context).

What is not the running line's doing is told apart and never blamed on it: garbage collection
(``gc.callbacks``), time the loop thread was runnable but the host gave it no CPU (Linux
scheduler statistics), the executor starting a worker thread, and blocks with no application
frame on the stack. Those are measured in ``asyncsentinel_event_loop_blocked_seconds``; only
blocks whose remaining time reaches ``loop_block_seconds`` become ``event_loop_blocked``
findings.

Cost: nothing runs per callback, so it works on any loop (asyncio, uvloop; no ``Handle._run``
patching) at a cost independent of request rate. An idle loop beats four times less often (a
request wakes it back to the configured rate at once), which keeps the idle cost near 0.2 % of
one core; the watchdog sleeps on an ``Event`` and wakes only when a heartbeat is overdue.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from asyncsentinel.config import Settings
from asyncsentinel.context import RequestState
from asyncsentinel.findings import EVENT_LOOP_BLOCKED, Dispatcher, EvidenceValue, Finding, Severity
from asyncsentinel.frames import Location, is_user_code, user_culprit
from asyncsentinel.instruments import EVENT_LOOP_BLOCKED as BLOCKED_SECONDS
from asyncsentinel.instruments import EVENT_LOOP_LAG
from asyncsentinel.sources import Source
from asyncsentinel.sources._task_requests import (
    HAS_TASK_CONTEXT,
    bind_root_task,
    request_of_task,
    unbind_root_task,
)

if TYPE_CHECKING:
    from asyncsentinel.sentinel import Sentinel

_EXECUTOR_SPAWN = ThreadPoolExecutor._adjust_thread_count.__code__
_IDLE_BEATS = 4  # an idle loop beats every 4 heartbeat intervals (at most the threshold)
_IDLE_CPU_SHARE = 100  # the loop thread used under 1/100 of the time since the last beat: idle
_STARVED_CPU_SHARE = 0.1  # runnable but given less of a CPU than this: starved, not computing
_LAG_BATCH = 32  # lag samples recorded together
_DEPTH_EVERY = 64  # beats between two measurements of the loop's dispatch depth
_STACK_LIMIT = 64  # innermost frames kept per sample
_MAX_SAMPLES = 256  # per incident; sampling also slows down during very long blocks
_BACKOFF_AFTER = 20  # samples at the base interval before the interval doubles
_MAX_SAMPLE_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class _Beat:
    """One heartbeat as it ran; replaced as a whole so the watchdog reads a consistent snapshot."""

    seq: int
    ran_ns: int
    next_due_ns: int
    cpu_ns: int  # loop thread CPU time when it ran
    gc_ns: int  # total GC time seen so far


@dataclass(frozen=True, slots=True)
class _LateBeat:
    """A heartbeat that ran late: the end of a stall, with what happened during it."""

    seq: int
    prev_ran_ns: int
    due_ns: int
    ran_ns: int
    cpu_ns: int  # CPU time the loop thread used since the previous heartbeat
    gc_ns: int  # time spent in garbage collection since the previous heartbeat
    paused: bool  # the loop was not running (stopped between run_until_complete calls)
    sched: tuple[int, int] | None  # the loop thread's (CPU, run-queue wait) ns when it ran


@dataclass(frozen=True, slots=True)
class StackSample:
    """The loop thread's stack, taken by the watchdog while the loop was blocked."""

    stack: tuple[Location, ...]
    """Outermost first (innermost :data:`_STACK_LIMIT` frames)."""
    culprit: Location | None
    request: RequestState | None
    task_name: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """A judged incident, ready to become a finding on the loop thread."""

    blocked_seconds: float
    started_at: float
    ended_at: float
    cause: str
    culprit: Location | None
    stack: tuple[Location, ...]
    request: RequestState | None
    evidence: dict[str, EvidenceValue]
    finding: bool = True
    """False: a real block, measured in the histogram, that is not the application's doing."""


def _open_schedstat() -> int:
    """A descriptor on this thread's ``/proc`` scheduler statistics, or -1 (not Linux)."""
    try:
        return os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        return -1


def _read_schedstat(schedstat_fd: int) -> tuple[int, int] | None:
    """(time on a CPU, time runnable but waiting for a CPU) in ns, from ``/proc`` (Linux)."""
    if schedstat_fd < 0:
        return None
    try:
        on_cpu, waiting, _ = os.pread(schedstat_fd, 128, 0).split()
        return int(on_cpu), int(waiting)
    except (OSError, ValueError):
        return None


def dominant_sample(samples: Sequence[StackSample]) -> tuple[StackSample, int] | None:
    """The sample that best represents a block, and how many samples agree with it.

    Votes by function first (a CPU loop spreads samples over several lines of one function),
    then by line within the winning function; ties go to the most recent sample, which is the
    one closest to the line that was still running when the block ended.
    """
    if not samples:
        return None

    def function_of(s: StackSample) -> tuple[str, str] | None:
        return (s.culprit.filename, s.culprit.function) if s.culprit else None

    functions = Counter(function_of(s) for s in samples)
    best_function = max(
        functions, key=lambda f: (functions[f], _last_index(samples, function_of, f))
    )
    in_function = [s for s in samples if function_of(s) == best_function]
    lines = Counter(s.culprit for s in in_function)
    best_line = max(
        lines, key=lambda loc: (lines[loc], _last_index(in_function, lambda s: s.culprit, loc))
    )
    chosen = next(s for s in reversed(in_function) if s.culprit == best_line)
    return chosen, functions[best_function]


def _last_index(samples: Sequence[StackSample], key: Any, value: object) -> int:
    return max(i for i, s in enumerate(samples) if key(s) == value)


def judge(
    late: _LateBeat,
    samples: Sequence[StackSample],
    *,
    threshold_ns: int,
    epoch_offset_ns: int,
    first_sample_ns: int = 0,
    first_sched: tuple[int, int] | None = None,
) -> Verdict | None:
    """Decide whether a stall is a blocked-loop incident, what caused it and who is to blame.

    The block started between the previous heartbeat and the one that ran late; its start is
    taken as the middle of that interval (error at most half a heartbeat interval). Garbage
    collection is not the running line's doing, nor is time the loop thread waited for a CPU
    the host gave to others (run-queue wait, Linux): a finding needs a user-code frame in the
    dominant sample and the code's own time to reach the threshold (or the whole block, less
    GC, when the thread was not starved of CPU). Otherwise the block is only measured
    (``finding=False``), or not at all when no sample saw code running on the loop (it sat idle
    in its selector: the process was starved of CPU, which the lag histogram shows).
    """
    if late.paused:
        return None
    started_ns = late.prev_ran_ns + (late.due_ns - late.prev_ran_ns) // 2
    blocked_ns = late.ran_ns - started_ns
    if blocked_ns < threshold_ns:
        return None
    blocked = blocked_ns / 1e9
    started_at = (started_ns + epoch_offset_ns) / 1e9
    ended_at = (late.ran_ns + epoch_offset_ns) / 1e9
    # Shares of the block the loop thread spent on a CPU and queued for one, from the scheduler
    # statistics between the first sample and the end (Linux), else from its CPU clock.
    window_ns = late.ran_ns - first_sample_ns
    if first_sched is not None and late.sched is not None and window_ns > 0:
        cpu_share = min(1.0, (late.sched[0] - first_sched[0]) / window_ns)
        wait_share = min(1.0 - cpu_share, (late.sched[1] - first_sched[1]) / window_ns)
    else:
        cpu_share, wait_share = min(1.0, late.cpu_ns / blocked_ns), 0.0
    wait_ns = int(wait_share * blocked_ns)
    evidence: dict[str, EvidenceValue] = {
        "blocked_seconds": round(blocked, 6),
        "started_at": started_at,
        "ended_at": ended_at,
        "gc_seconds": round(late.gc_ns / 1e9, 6),
        "cpu_seconds": round(cpu_share * blocked, 6),
        "cpu_wait_seconds": round(wait_ns / 1e9, 6),
        "samples": len(samples),
    }
    if first_sample_ns:
        evidence["detection_delay_seconds"] = round((first_sample_ns - started_ns) / 1e9, 6)
    if late.gc_ns * 2 >= blocked_ns:
        # A collection pause: the line that happened to allocate is innocent.
        if samples and samples[-1].culprit is not None:
            evidence["collection_during"] = str(samples[-1].culprit)
        evidence["cause"] = "garbage_collection"
        return Verdict(
            blocked,
            started_at,
            ended_at,
            "garbage_collection",
            None,
            (),
            None,
            evidence,
            # The runtime's doing, not a line's: measured, never a finding.
            finding=False,
        )
    best = dominant_sample(samples)
    if best is None:
        return None
    sample, agreeing = best
    # Computing = on a CPU or queued for one; a starved CPU loop is still a CPU loop, while a
    # thread in sleep() or read() is neither.
    # The code's own time excludes waiting for a CPU the host gave to others. A block counts
    # when that reaches the threshold, or when the thread was not starved (runnable but given
    # under a tenth of a CPU) and the whole block, less GC, does: a line descheduled on an
    # overloaded host is not what held the loop, a CPU loop sharing a busy host is.
    own_ns = blocked_ns - late.gc_ns - wait_ns
    starved = wait_share >= 0.5 and cpu_share < _STARVED_CPU_SHARE
    reportable = own_ns >= threshold_ns or (not starved and blocked_ns - late.gc_ns >= threshold_ns)
    if not reportable and starved:
        cause = "cpu_starvation"
    elif cpu_share + wait_share >= 0.5:
        cause = "cpu"
    else:
        cause = "blocking_call"
    evidence["cause"] = cause
    evidence["culprit_samples"] = agreeing
    if sample.task_name:
        evidence["task"] = sample.task_name
    return Verdict(
        blocked,
        started_at,
        ended_at,
        cause,
        sample.culprit,
        sample.stack,
        sample.request,
        evidence,
        # No user frame: framework internals (e.g. a first-request warm-up) the application
        # cannot change; measured, not reported.
        finding=sample.culprit is not None and reportable,
    )


def _message(v: Verdict) -> str:
    secs = f"{v.blocked_seconds:.3f} s"
    n, agree = v.evidence.get("samples", 0), v.evidence.get("culprit_samples", 0)
    what = (
        "computing on the loop thread (CPU-bound)"
        if v.cause == "cpu"
        else "waiting in a blocking call (sleep, file or socket I/O, a lock)"
    )
    return (
        f"the event loop was blocked for {secs}, {what}; {agree} of {n} stack samples taken "
        f"during the block were in this function. No other request or callback ran meanwhile: "
        f"use the async equivalent or move the work off the loop with asyncio.to_thread()"
    )


class LoopMonitor:
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
        self._beat: _Beat | None = None
        # Recent late heartbeats, appended by the loop, read by the watchdog (deque appends and
        # copies are atomic); a few, so a watchdog that wakes late still finds the one it needs.
        self._lates: deque[_LateBeat] = deque(maxlen=16)
        self._loop_thread_id = 0
        self._dispatch_depth = 0  # stack depth at which the loop dispatches callbacks
        self._paused_seq = -1
        self._gc_started_ns = 0
        self._gc_total_ns = 0
        self._schedstat_fd = -1
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
            self._schedstat_fd = _open_schedstat()
        now = time.monotonic_ns()
        cpu = time.thread_time_ns()
        gc_total = self._gc_total_ns
        if prev is not None:
            lag = now - prev.next_due_ns
            paused = prev.seq == self._paused_seq
            if lag >= self._early_ns:
                # Published before the new beat, so a watchdog that sees the beat sees this too;
                # woken so the incident is judged now, not after its next sampling pause.
                self._lates.append(
                    _LateBeat(
                        prev.seq + 1,
                        prev.ran_ns,
                        prev.next_due_ns,
                        now,
                        cpu - prev.cpu_ns,
                        gc_total - prev.gc_ns,
                        paused,
                        _read_schedstat(self._schedstat_fd),
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
        self._beat = _Beat(seq, now, now + interval_ns, cpu, gc_total)
        self._handle = loop.call_later(interval_ns / 1e9, self._heartbeat)

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
        now = time.monotonic_ns()
        self._beat = _Beat(
            prev.seq + 1, now, now + self._interval_ns, time.thread_time_ns(), self._gc_total_ns
        )
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
                    _message(verdict),
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
            self._gc_started_ns = time.monotonic_ns()
        elif self._gc_started_ns:
            self._gc_total_ns += time.monotonic_ns() - self._gc_started_ns
            self._gc_started_ns = 0

    # --- on the watchdog thread -------------------------------------------------------------------
    def _watch(self) -> None:
        examined_seq = -1
        try:
            while not self._stop_requested:
                loop, beat = self._loop, self._beat
                if loop is None:
                    return
                if beat is None:  # the first heartbeat has not run yet
                    if self._sleep(self.heartbeat_seconds):
                        return
                    continue
                delay = (beat.next_due_ns + self._early_ns - time.monotonic_ns()) / 1e9
                if delay > 0 and self._sleep(delay):
                    return
                samples: list[StackSample] = []
                first_ns, first_sched = 0, None
                if self._beat is beat:
                    if loop.is_closed():
                        # Closed without stop(): release what start() took, then end.
                        self.stop()
                        return
                    if not loop.is_running():
                        # Between run_until_complete calls: the late beat measures a pause.
                        self._paused_seq = beat.seq
                        if self._sleep(self.heartbeat_seconds):
                            return
                        continue
                    first_ns, first_sched = self._follow_stall(loop, beat, samples)
                for late in list(self._lates):
                    if late.seq <= examined_seq:
                        continue
                    examined_seq = late.seq
                    matched = samples if late.seq == beat.seq + 1 else []
                    verdict = judge(
                        late,
                        matched,
                        threshold_ns=self._threshold_ns,
                        epoch_offset_ns=time.time_ns() - time.monotonic_ns(),
                        first_sample_ns=first_ns if matched else 0,
                        first_sched=first_sched if matched else None,
                    )
                    if verdict is not None:
                        # RuntimeError: the loop closed before the incident could be reported.
                        with contextlib.suppress(RuntimeError):
                            loop.call_soon_threadsafe(self._emit, verdict)
        except Exception as exc:
            self._dispatcher.report_error("source.loop.watchdog", exc)

    def _sleep(self, seconds: float) -> bool:
        """Wait up to *seconds* (or until woken); True when the monitor is stopping."""
        if self._wake.wait(seconds):
            self._wake.clear()
        return self._stop_requested

    def _follow_stall(
        self, loop: asyncio.AbstractEventLoop, beat: _Beat, samples: list[StackSample]
    ) -> tuple[int, tuple[int, int] | None]:
        """Sample the loop thread until the heartbeat runs again.

        Returns when the first sample was taken and the loop thread's scheduler statistics then.
        """
        interval = self._sample_interval
        first_ns = taken = 0
        first_sched = None
        while self._beat is beat:
            if not loop.is_running():
                self._paused_seq = beat.seq
                return 0, None
            sample = self._sample(loop)
            if self._beat is not beat:
                break  # the loop came back while we sampled: the stack may be after the block
            taken += 1
            if not first_ns:
                first_ns = time.monotonic_ns()
                first_sched = _read_schedstat(self._schedstat_fd)
            if sample is not None and len(samples) < _MAX_SAMPLES:
                samples.append(sample)
            if taken >= _BACKOFF_AFTER:
                interval = min(interval * 2, _MAX_SAMPLE_INTERVAL)
            if self._sleep(interval):
                return 0, None
        return first_ns, first_sched

    def _sample(self, loop: asyncio.AbstractEventLoop) -> StackSample | None:
        """The loop thread's stack now, or ``None`` when it is not running a callback."""
        # asyncio.current_task(loop) reads asyncio's per-loop "current task" map: a single
        # dict lookup, atomic under the GIL, valid from any thread (also under uvloop).
        task = asyncio.current_task(loop)
        frame = sys._current_frames().get(self._loop_thread_id)
        raw = []
        while frame is not None:
            raw.append((frame.f_code, frame.f_lineno))
            frame = frame.f_back
        running = len(raw) - self._dispatch_depth
        if running <= 0:
            # At (or below) the depth where the loop calls callbacks: idle in the selector or
            # in the loop's own bookkeeping, so not blocked by code; the CPU was elsewhere.
            return None
        # Only the frames of the callback or task being run: the loop machinery below it
        # (thread bootstrap, server, runner) is the same for every incident.
        stack = tuple(
            Location(code.co_filename, lineno or 0, code.co_qualname)
            for code, lineno in reversed(raw[: min(running, _STACK_LIMIT)])
        )
        culprit = user_culprit(stack)
        for code, _ in raw[:running]:
            if code is _EXECUTOR_SPAWN:
                # Stuck in ThreadPoolExecutor starting a worker (Thread.start() waits for the
                # new thread to be scheduled, slow on a starved host): the runtime's doing,
                # not the user's to_thread()/run_in_executor() call.
                culprit = None
            if is_user_code(code.co_filename):
                break
        return StackSample(
            stack,
            culprit,
            request_of_task(task),
            task.get_name() if task is not None else "",
        )


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
        if monitor is not None and monitor._idle:
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
