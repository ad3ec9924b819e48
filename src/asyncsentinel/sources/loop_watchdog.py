"""The loop monitor's watchdog thread: it waits for an overdue heartbeat and samples the stall.

:class:`LoopWatchdog` holds the work :class:`~asyncsentinel.sources.loop.LoopMonitor` runs on its
watchdog thread, as a mixin so the heartbeat and the watchdog share one object's attributes and
the heartbeat (on the application's loop) pays no extra call or lookup for the split. The thread
sleeps on an ``Event`` until the latest heartbeat (a :class:`Beat` snapshot) is overdue; if the
loop has still not run it, it samples the loop thread's stack with ``sys._current_frames()``
*while the loop is blocked*, several times during a long block, slowing down during very long
ones. When the loop comes back, each late heartbeat the loop published is judged here, off the
loop (:func:`asyncsentinel.sources.loop_judge.judge`), and the verdict is handed to the loop with
``call_soon_threadsafe``. The request is the one whose task was running
(``asyncio.current_task(loop)`` read by the watchdog, then the task's context); the block's
start is bounded by the latest moment the loop is known to have been alive, read while it is
blocked.

The watchdog reads what the loop publishes (:class:`Beat` snapshots replaced as a whole, a deque
of :class:`~asyncsentinel.sources.loop_judge.LateBeat`, a few integers) and writes back only one
integer the heartbeat reads (the sequence number of a beat that spanned a pause of the loop):
no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncsentinel.findings import Dispatcher
from asyncsentinel.sources._task_requests import request_of_task
from asyncsentinel.sources.loop_judge import LateBeat, StackSample, Verdict, judge, stack_sample

# The clock of RequestState.start_ns, so a request's start bounds a block's start.
_clock = time.perf_counter_ns
_MAX_SAMPLES = 256  # per incident; sampling also slows down during very long blocks
_BACKOFF_AFTER = 20  # samples at the base interval before the interval doubles
_MAX_SAMPLE_INTERVAL = 1.0


@dataclass(slots=True)
class Beat:
    """One heartbeat as it ran; never changed once published (replaced as a whole, so the
    watchdog reads a consistent snapshot). Not frozen: a frozen dataclass costs ~3x as much to
    build, and this one is built 40 times a second on the application's loop."""

    seq: int
    ran_ns: int
    next_due_ns: int
    cpu_ns: int  # loop thread CPU time when it ran
    wait_ns: int  # loop thread run-queue wait when it ran (-1: unknown, not Linux)
    gc_ns: int  # total GC time seen so far


class LoopWatchdog:
    """The watchdog thread's work for :class:`~asyncsentinel.sources.loop.LoopMonitor`.

    A mixin: the monitor sets every attribute declared here in its ``__init__`` and runs
    :meth:`_watch` as the thread's target.
    """

    # Set by the monitor; the heartbeat publishes _beat, _lates, _loop_thread_id,
    # _dispatch_depth; request_started publishes _alive_ns.
    heartbeat_seconds: float
    _dispatcher: Dispatcher
    _loop: asyncio.AbstractEventLoop | None
    _beat: Beat | None
    _lates: deque[LateBeat]
    _wake: threading.Event  # stop, a late heartbeat to judge, or the loop left idle mode
    _stop_requested: bool
    _threshold_ns: int
    _interval_ns: int
    _early_ns: int  # how long after a beat's due time sampling starts
    _sample_interval: float
    _loop_thread_id: int
    _dispatch_depth: int
    _alive_ns: int
    _paused_seq: int  # written here: the beat whose lateness is a pause of the loop, not a block

    if TYPE_CHECKING:

        def stop(self) -> None: ...

        def _emit(self, verdict: Verdict) -> None: ...

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
                delay = (beat.next_due_ns + self._early_ns - _clock()) / 1e9
                if delay > 0 and self._sleep(delay):
                    return
                samples: list[StackSample] = []
                first_ns = 0
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
                    first_ns = self._follow_stall(loop, beat, samples)
                for late in list(self._lates):
                    if late.seq <= examined_seq:
                        continue
                    examined_seq = late.seq
                    matched = samples if late.seq == beat.seq + 1 else []
                    verdict = judge(
                        late,
                        matched,
                        threshold_ns=self._threshold_ns,
                        epoch_offset_ns=time.time_ns() - _clock(),
                        tight_ns=self._interval_ns,
                        first_sample_ns=first_ns if matched else 0,
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
        self, loop: asyncio.AbstractEventLoop, beat: Beat, samples: list[StackSample]
    ) -> int:
        """Sample the loop thread until the heartbeat runs again; returns when the first sample
        was taken (0: none, or the loop was paused or the monitor stopped)."""
        interval = self._sample_interval
        first_ns = taken = 0
        while self._beat is beat:
            if not loop.is_running():
                self._paused_seq = beat.seq
                return 0
            sample = self._sample(loop)
            if self._beat is not beat:
                break  # the loop came back while we sampled: the stack may be after the block
            taken += 1
            if not first_ns:
                first_ns = _clock()
            if sample is not None and len(samples) < _MAX_SAMPLES:
                samples.append(sample)
            if taken >= _BACKOFF_AFTER:
                interval = min(interval * 2, _MAX_SAMPLE_INTERVAL)
            if self._sleep(interval):
                return 0
        return first_ns

    def _sample(self, loop: asyncio.AbstractEventLoop) -> StackSample | None:
        """The loop thread's stack now, or ``None`` when it is not running a callback."""
        # asyncio.current_task(loop) reads asyncio's per-loop "current task" map: a single
        # dict lookup, atomic under the GIL, valid from any thread (also under uvloop).
        task = asyncio.current_task(loop)
        frame = sys._current_frames().get(self._loop_thread_id)
        request = request_of_task(task)
        # Read now, while the loop is blocked: these moments all came before the block.
        alive = self._alive_ns
        if request is not None:
            alive = max(alive, request.start_ns, request.response_end_ns)
        name = task.get_name() if task is not None else ""
        return stack_sample(frame, self._dispatch_depth, request, name, alive)
