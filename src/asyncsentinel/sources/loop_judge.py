"""Judging a stalled event loop: was it blocked, by what, for how long, and whose doing was it.

Functions over what the loop monitor (:mod:`asyncsentinel.sources.loop`) recorded: the heartbeat
that ran late (:class:`LateBeat`), the stacks its watchdog
(:mod:`asyncsentinel.sources.loop_watchdog`) sampled while the loop was stalled
(:class:`StackSample`, made by :func:`stack_sample`) and the loop thread's scheduler statistics.
No threads, no clocks: everything here is testable with constructed values.
"""

from __future__ import annotations

import dis
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType

from asyncsentinel.context import RequestState
from asyncsentinel.findings import EvidenceValue
from asyncsentinel.frames import Location, is_user_code, user_culprit

STARVED_CPU_SHARE = 0.1
"""A thread runnable but given less of a CPU than this during a stall was starved, not computing."""
STACK_LIMIT = 64
"""Innermost frames kept per sample."""

_EXECUTOR_SPAWN = ThreadPoolExecutor._adjust_thread_count.__code__
# Where a thread running Python code stops to hand the GIL to another between bytecodes.
_GIL_HANDOVER_OPCODES = frozenset(
    dis.opmap[name] for name in ("RESUME", "JUMP_BACKWARD") if name in dis.opmap
)


@dataclass(frozen=True, slots=True)
class LateBeat:
    """A heartbeat that ran late: the end of a stall, with what happened since the beat before.

    Times are ``time.perf_counter_ns()`` values (the clock :class:`RequestState` uses too).
    """

    seq: int
    prev_ran_ns: int
    """When the previous heartbeat ran: the loop was alive then, so the stall began later."""
    due_ns: int
    """When this heartbeat was due: the stall had begun by then."""
    ran_ns: int
    """When it ran: the stall was over."""
    cpu_ns: int
    """CPU time the loop thread used between the two heartbeats."""
    wait_ns: int | None
    """Time it was runnable but waiting for a CPU between them (Linux), ``None`` if unknown."""
    gc_ns: int
    """Time spent in garbage collection between them."""
    paused: bool = False
    """The loop was not running (stopped between ``run_until_complete`` calls)."""


@dataclass(frozen=True, slots=True)
class StackSample:
    """The loop thread's stack, taken by the watchdog while the loop was blocked."""

    stack: tuple[Location, ...]
    """Outermost first (the innermost :data:`STACK_LIMIT` frames of the callback or task)."""
    culprit: Location | None
    request: RequestState | None
    task_name: str
    in_bytecode: bool = False
    """The innermost frame stood where the interpreter hands the GIL over between bytecodes (a
    function's start, a loop's jump back): the thread was running Python code. In a blocking
    call (sleep, read, lock) it stands at the call instead."""
    alive_ns: int = 0
    """The latest moment the loop is known to have been running before this sample, besides
    heartbeats: the start of the latest request, or the start (or response end) of the sampled
    request; read while the loop was blocked, so before the block began. 0: none."""


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


def open_schedstat() -> int:
    """A descriptor on the calling thread's ``/proc`` scheduler statistics, or -1 (not Linux)."""
    try:
        return os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        return -1


def read_schedstat(schedstat_fd: int) -> tuple[int, int] | None:
    """(time on a CPU, time runnable but waiting for a CPU) in ns, from ``/proc`` (Linux)."""
    if schedstat_fd < 0:
        return None
    try:
        on_cpu, waiting, _ = os.pread(schedstat_fd, 128, 0).split()
        return int(on_cpu), int(waiting)
    except (OSError, ValueError):
        return None


def stack_sample(
    frame: FrameType | None,
    dispatch_depth: int,
    request: RequestState | None,
    task_name: str,
    alive_ns: int,
) -> StackSample | None:
    """What the loop thread's innermost *frame* says, or ``None`` when it is not running a
    callback (*dispatch_depth*: the stack depth at which the loop calls callbacks)."""
    in_bytecode = frame is not None and _opcode_at(frame) in _GIL_HANDOVER_OPCODES
    raw = []
    while frame is not None:
        raw.append((frame.f_code, frame.f_lineno))
        frame = frame.f_back
    running = len(raw) - dispatch_depth
    if running <= 0:
        # At (or below) the depth where the loop calls callbacks: idle in the selector or in
        # the loop's own bookkeeping, so not blocked by code; the CPU was elsewhere.
        return None
    # Only the frames of the callback or task being run: the loop machinery below it (thread
    # bootstrap, server, runner) is the same for every incident.
    stack = tuple(
        Location(code.co_filename, lineno or 0, code.co_qualname)
        for code, lineno in reversed(raw[: min(running, STACK_LIMIT)])
    )
    culprit = user_culprit(stack)
    for code, _ in raw[:running]:
        if code is _EXECUTOR_SPAWN:
            # Stuck in ThreadPoolExecutor starting a worker (Thread.start() waits for the new
            # thread to be scheduled, slow on a starved host): the runtime's doing, not the
            # user's to_thread()/run_in_executor() call.
            culprit = None
        if is_user_code(code.co_filename):
            break
    return StackSample(stack, culprit, request, task_name, in_bytecode, alive_ns)


def _opcode_at(frame: FrameType) -> int:
    """The (unspecialized) opcode of the instruction *frame* is at, or -1."""
    code, offset = frame.f_code.co_code, frame.f_lasti
    return code[offset] if 0 <= offset < len(code) else -1


def dominant_sample(samples: Sequence[StackSample]) -> tuple[StackSample, int] | None:
    """The sample that best represents a block, and how many samples agree with it.

    Votes by function first (a CPU loop spreads samples over several lines of one function),
    then by line within the winning function; ties go to the earliest sample. The last sample
    may show the code that ran just *after* the block: a CPU-bound loop thread gives the
    watchdog the GIL only after the interpreter's switch interval (5 ms), and if the block ends
    meanwhile the stack is taken after it, before the late heartbeat gets to run. The first
    sample is always well inside a block over the threshold.
    """
    if not samples:
        return None

    def function_of(s: StackSample) -> tuple[str, str] | None:
        return (s.culprit.filename, s.culprit.function) if s.culprit else None

    functions = Counter(function_of(s) for s in samples)
    best_function = max(
        functions, key=lambda f: (functions[f], -_first_index(samples, function_of, f))
    )
    in_function = [s for s in samples if function_of(s) == best_function]
    lines = Counter(s.culprit for s in in_function)
    best_line = max(
        lines, key=lambda loc: (lines[loc], -_first_index(in_function, lambda s: s.culprit, loc))
    )
    chosen = next(s for s in in_function if s.culprit == best_line)
    return chosen, functions[best_function]


def _first_index(
    samples: Sequence[StackSample], key: Callable[[StackSample], object], value: object
) -> int:
    return next(i for i, s in enumerate(samples) if key(s) == value)


def block_start(late: LateBeat, samples: Sequence[StackSample], tight_ns: int) -> tuple[int, int]:
    """When the block began (ns), and how wide the interval known to hold that moment was.

    The block began after the latest moment the loop is known to have been alive: the previous
    heartbeat, or a request that started (or finished its response) later, as read by the
    samples while the loop was blocked (the earliest reading: a last sample taken just after
    the block ended could see a later one). It began by the time the late heartbeat was due.
    When that interval is at most *tight_ns* (a busy loop's heartbeat interval) the block is
    taken to begin at its start: the blocked time is an upper bound, tight to within the
    interval, and a block over the threshold is never judged under it. A wider interval (after
    an idle spell, when beats are further apart and nothing marked the loop alive since) is
    split in the middle, so a block that began just before the heartbeat was due is not
    inflated by the whole idle interval.
    """
    start_lo = late.prev_ran_ns
    stamps = [s.alive_ns for s in samples]
    if stamps and start_lo < min(stamps) <= late.ran_ns:
        start_lo = min(stamps)
    bracket = max(0, late.due_ns - start_lo)
    if bracket <= tight_ns:
        return start_lo, bracket
    return start_lo + bracket // 2, bracket


def judge(
    late: LateBeat,
    samples: Sequence[StackSample],
    *,
    threshold_ns: int,
    epoch_offset_ns: int,
    tight_ns: int,
    first_sample_ns: int = 0,
) -> Verdict | None:
    """Decide whether a stall is a blocked-loop incident, what caused it and who is to blame.

    The block's start comes from :func:`block_start`. Garbage collection is not the running
    line's doing, nor is time the loop thread waited for a CPU the host gave to others
    (run-queue wait, Linux). The loop thread's CPU and run-queue shares are taken over the whole
    stall (from the previous heartbeat to the late one): a CPU loop is runnable throughout and
    counts in full whenever it got at least :data:`STARVED_CPU_SHARE` of a CPU; a thread that
    mostly queued for a CPU and got less than that was starved, and only its own time (the
    stall less GC and queueing) counts. A finding needs a user-code frame in the dominant sample
    and the counted time to reach the threshold. Otherwise the block is only measured
    (``finding=False``), or not at all when no sample saw code running on the loop (it sat idle
    in its selector: the process was starved of CPU, which the lag histogram shows).
    """
    if late.paused:
        return None
    best = dominant_sample(samples)
    started_ns, bracket_ns = block_start(late, samples, tight_ns)
    blocked_ns = late.ran_ns - started_ns
    if blocked_ns < threshold_ns:
        return None
    blocked = blocked_ns / 1e9
    started_at = (started_ns + epoch_offset_ns) / 1e9
    ended_at = (late.ran_ns + epoch_offset_ns) / 1e9
    # Shares of the stall the loop thread spent on a CPU and queued for one, over the whole
    # window between the two heartbeats: the block and at most a busy heartbeat interval before
    # it. After an idle spell the loop used (next to) nothing before the block, so the block
    # alone is the measure. Without scheduler statistics, queueing is unknown: counted as none.
    window_ns = late.ran_ns - late.prev_ran_ns if bracket_ns <= tight_ns else blocked_ns
    window_ns = max(window_ns, blocked_ns)
    cpu_share = min(1.0, late.cpu_ns / window_ns)
    wait_share = 0.0 if late.wait_ns is None else min(1.0 - cpu_share, late.wait_ns / window_ns)
    wait_ns = min(late.wait_ns or 0, blocked_ns)
    evidence: dict[str, EvidenceValue] = {
        "blocked_seconds": round(blocked, 6),
        "started_at": started_at,
        "ended_at": ended_at,
        "start_uncertainty_seconds": round(bracket_ns / 1e9, 6),
        "gc_seconds": round(late.gc_ns / 1e9, 6),
        "cpu_seconds": round(min(late.cpu_ns, blocked_ns) / 1e9, 6),
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
        # The runtime's doing, not a line's: measured, never a finding.
        return Verdict(
            blocked, started_at, ended_at, "garbage_collection", None, (), None, evidence, False
        )
    if best is None:
        return None
    sample, agreeing = best
    # A CPU loop on a busy host is runnable throughout: on a CPU or queued for one. Whenever it
    # got a fair slice of a CPU it counts in full: it held the loop, the host only slowed it.
    # A thread that got almost no CPU and mostly queued was starved: a line descheduled (say a
    # short sleep, then no CPU for 100 ms) is not what held the loop, so only its own time
    # (the block less GC and queueing) counts.
    own_ns = blocked_ns - late.gc_ns - wait_ns
    starved = wait_share >= 0.5 and cpu_share < STARVED_CPU_SHARE
    reportable = own_ns >= threshold_ns or (not starved and blocked_ns - late.gc_ns >= threshold_ns)
    if not reportable and starved:
        cause = "cpu_starvation"
    elif cpu_share + wait_share >= 0.5 or (
        cpu_share >= STARVED_CPU_SHARE and 2 * sum(s.in_bytecode for s in samples) >= len(samples)
    ):
        # Computing: on a CPU or queued for one most of the time, or, when other threads of
        # the process held the GIL much of the time (the loop thread then sleeps waiting for
        # it, which looks like a blocking call), found running Python code by most samples.
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


def message(v: Verdict) -> str:
    """The finding's message for a judged incident."""
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
