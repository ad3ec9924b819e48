"""Event-loop monitor: blocked-loop incidents (metric, span, log with the blocking line), lag,
GC pauses, CPU loops on a host whose cores other processes take, healthy controls under
concurrent load, standalone LoopMonitor; asyncio and uvloop. Then the judging of a stall (pure
functions, constructed values).

Every block here is real (time.sleep, a CPU loop, a FIFO read, a socket read, a gc.collect()
of real garbage) and is 0.5 s long against a 0.1 s threshold, so a loaded machine only makes
the margin larger. One exception: a 110 ms block right after a heartbeat, whose timing can
only err upwards (it is tried three times, in case the watchdog oversleeps its chance to
sample it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import assume, given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import asyncsentinel
from asyncsentinel import EVENT_LOOP_BLOCKED, Finding, Location, LoopMonitor, Sentinel
from asyncsentinel.context import RequestState
from asyncsentinel.sources.loop_judge import (
    LateBeat,
    StackSample,
    Verdict,
    dominant_sample,
    judge,
    stack_sample,
)
from tests import support
from tests.support import sample, serve, wait_for

BLOCK = 0.5
THIS_FILE = os.path.abspath(__file__)
LOOPS = ["asyncio", "uvloop"]
QUIET = {"sqlalchemy": False, "aiohttp": False, "log_rate_limit_seconds": 0}


def line_of(marker: str) -> int:
    """Line number of the statement tagged ``# <marker>`` in this file."""
    return support.line_of(THIS_FILE, f"# {marker}")


def _crunch() -> int:
    return sum(i * i for i in range(2000))  # BLOCK:cpu


def cpu_work(seconds: float) -> int:
    """Pure CPU work until this thread has used *seconds* of CPU: the loop is blocked at least
    that long in wall time (longer when the host gives the thread less than a whole CPU)."""
    total, start = 0, time.thread_time()
    while time.thread_time() - start < seconds:
        total += _crunch()
    return total


def blocking_app(tmp: Path) -> FastAPI:
    app = FastAPI()
    fifo = tmp / "slow.fifo"
    os.mkfifo(fifo)

    def write_fifo_later() -> None:
        with open(fifo, "wb") as writer:  # opens as soon as the reader does
            time.sleep(BLOCK)
            writer.write(b"x")

    @app.get("/sleep")
    async def sleep_route() -> dict[str, str]:
        time.sleep(BLOCK)  # BLOCK:sleep
        return {"ok": "sleep"}

    @app.get("/cpu")
    async def cpu_route() -> dict[str, str]:
        cpu_work(BLOCK)
        return {"ok": "cpu"}

    @app.get("/file")
    async def file_route() -> dict[str, str]:
        threading.Thread(target=write_fifo_later, daemon=True).start()
        with open(fifo, "rb") as reader:
            data = reader.read(1)  # BLOCK:file
        return {"ok": data.decode()}

    @app.get("/socket")
    async def socket_route() -> dict[str, str]:
        ours, theirs = socket.socketpair()
        threading.Timer(BLOCK, theirs.sendall, (b"y",)).start()
        with ours, theirs:
            data = ours.recv(1)  # BLOCK:socket
        return {"ok": data.decode()}

    @app.get("/child")
    async def child_route() -> dict[str, str]:
        async def blocker() -> None:
            time.sleep(BLOCK)  # BLOCK:child

        async with asyncio.TaskGroup() as tg:
            tg.create_task(blocker())
        return {"ok": "child"}

    return app


def healthy_app() -> FastAPI:
    app = FastAPI()

    @app.get("/async-sleep")
    async def async_sleep() -> dict[str, str]:
        await asyncio.sleep(0.2)
        return {"ok": "async-sleep"}

    @app.get("/to-thread")
    async def to_thread() -> dict[str, str]:
        await asyncio.to_thread(time.sleep, BLOCK)
        return {"ok": "to-thread"}

    @app.get("/taskgroup")
    async def taskgroup() -> dict[str, str]:
        async def slow() -> None:
            await asyncio.sleep(5)

        async def quick() -> int:
            await asyncio.sleep(0.01)
            return 1

        try:
            async with asyncio.timeout(0.2), asyncio.TaskGroup() as tg:
                tg.create_task(quick())
                tg.create_task(slow())
        except TimeoutError:
            pass
        return {"ok": "taskgroup"}

    return app


def instrumented(
    app: FastAPI, registry: CollectorRegistry, tracer_provider: Any, **options: Any
) -> Sentinel:
    return asyncsentinel.instrument(
        app,
        registry=registry,
        tracer_provider=tracer_provider,
        server_span=True,
        **{**QUIET, **options},
    )


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


@pytest.mark.e2e
@pytest.mark.parametrize("loop", LOOPS)
def test_blocking_routes_are_reported_with_the_blocking_line(
    loop: str,
    tmp_path: Path,
    registry: CollectorRegistry,
    tracer_provider: Any,
    spans: InMemorySpanExporter,
    finding_logs: pytest.LogCaptureFixture,
    sentinels: list[Sentinel],
) -> None:
    app = blocking_app(tmp_path)
    sentinel = instrumented(app, registry, tracer_provider, loop_block_seconds=0.1)
    sentinels.append(sentinel)
    cases = {
        "/sleep": ("BLOCK:sleep", "blocking_call"),
        "/cpu": ("BLOCK:cpu", "cpu"),
        "/file": ("BLOCK:file", "blocking_call"),
        "/socket": ("BLOCK:socket", "blocking_call"),
    }
    with serve(app, loop=loop) as base, httpx.Client(base_url=base, timeout=30) as client:
        for route, (marker, cause) in cases.items():
            assert client.get(route).status_code == 200
            found: list[Finding] = wait_for(
                lambda r=route: sentinel.findings(EVENT_LOOP_BLOCKED, http_route=r)
            )
            assert len(found) == 1, found
            finding = found[0]
            line = line_of(marker)
            assert finding.culprit is not None
            assert (finding.culprit.filename, finding.culprit.lineno) == (THIS_FILE, line)
            assert finding.evidence["cause"] == cause
            assert finding.evidence["blocked_seconds"] >= 0.4
            assert finding.http_method == "GET"
            # Metrics: the incident histogram and the finding counter, by route.
            assert (
                sample(registry, "asyncsentinel_event_loop_blocked_seconds_count", http_route=route)
                == 1
            )
            assert (
                sample(registry, "asyncsentinel_event_loop_blocked_seconds_sum", http_route=route)
                >= 0.4
            )
            assert (
                sample(
                    registry,
                    "asyncsentinel_findings_total",
                    kind="event_loop_blocked",
                    http_route=route,
                )
                == 1
            )
            # Log: the culprit's file:line and the stack with the blocking source line.
            record = wait_for(
                lambda ln=line: [
                    r for r in finding_logs.records if f"{THIS_FILE}:{ln} in" in r.getMessage()
                ]
            )[0]
            text = record.getMessage()
            assert f"event_loop_blocked on GET {route} at {THIS_FILE}:{line}" in text
            assert Path(THIS_FILE).read_text().splitlines()[line - 1].strip() in text
        assert client.get("/metrics").status_code == 200
    # OTel: one span per incident spanning the block, linked to the request's server span.
    blocked_spans = spans_named(spans, "asyncsentinel.event_loop.blocked")
    assert len(blocked_spans) == len(cases)
    for route, (marker, _) in cases.items():
        request_span = spans_named(spans, f"GET {route}")[0]
        span = next(s for s in blocked_spans if s.attributes["http.route"] == route)
        assert span.attributes["code.line.number"] == line_of(marker)
        assert span.attributes["code.file.path"] == THIS_FILE
        assert [link.context.span_id for link in span.links] == [request_span.context.span_id]
        assert span.end_time - span.start_time >= 0.4e9  # a lower bound: load only adds


@pytest.mark.e2e
def test_block_in_a_child_task_is_attributed_to_its_request(
    tmp_path: Path, registry: CollectorRegistry, tracer_provider: Any, sentinels: list[Sentinel]
) -> None:
    app = blocking_app(tmp_path)
    sentinel = instrumented(app, registry, tracer_provider, loop_block_seconds=0.1)
    sentinels.append(sentinel)
    with serve(app) as base:
        assert httpx.get(f"{base}/child", timeout=30).status_code == 200
        finding = wait_for(lambda: sentinel.findings(EVENT_LOOP_BLOCKED))[0]
    assert finding.http_route == "/child"
    assert finding.culprit is not None
    assert finding.culprit.lineno == line_of("BLOCK:child")
    assert finding.culprit.function.endswith("blocker")


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """*count* busy-looping processes beside the test: a host whose cores other work takes."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def spin(seconds: float) -> int:
    """A CPU loop that holds the thread for *seconds* of wall-clock time, however little CPU
    the host gives it (as a polling loop, or a computation sized by time, does)."""
    acc, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:  # BLOCK:spin
        acc = (acc * 31 + 7) % 1_000_003  # BLOCK:spin-body
    return acc


@pytest.mark.e2e
@pytest.mark.parametrize("loop", LOOPS)
def test_cpu_loop_is_reported_while_other_processes_hog_both_cores(
    loop: str, registry: CollectorRegistry, tracer_provider: Any, sentinels: list[Sentinel]
) -> None:
    app = FastAPI()

    @app.get("/spin")
    async def spin_route() -> dict[str, int]:
        return {"acc": spin(BLOCK)}

    sentinel = instrumented(app, registry, tracer_provider, loop_block_seconds=0.1)
    sentinels.append(sentinel)
    # Two busy processes on a 2-core host: the loop thread queues for a CPU much of the time.
    with cpu_hogs(2), serve(app, loop=loop) as base:
        assert httpx.get(f"{base}/spin", timeout=30).status_code == 200
        [finding] = wait_for(lambda: sentinel.findings(EVENT_LOOP_BLOCKED))
    assert finding.http_route == "/spin"
    assert finding.culprit is not None
    assert finding.culprit.filename == THIS_FILE
    assert finding.culprit.lineno in {line_of("BLOCK:spin"), line_of("BLOCK:spin-body")}
    assert finding.evidence["cause"] == "cpu"
    assert finding.evidence["blocked_seconds"] >= BLOCK


async def healthy_load(base: str) -> None:
    """Concurrent requests to :func:`healthy_app`'s routes, twice over."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for _ in range(2):
            responses = await asyncio.gather(
                *(
                    client.get(route)
                    for route in ("/async-sleep", "/to-thread", "/taskgroup")
                    for _ in range(8)
                )
            )
            assert all(r.status_code == 200 for r in responses)


@pytest.mark.e2e
@pytest.mark.parametrize(("loop", "hogs"), [("asyncio", 0), ("uvloop", 0), ("asyncio", 2)])
def test_healthy_routes_under_concurrent_load_report_nothing(
    loop: str,
    hogs: int,
    registry: CollectorRegistry,
    tracer_provider: Any,
    sentinels: list[Sentinel],
) -> None:
    app = healthy_app()
    sentinel = instrumented(app, registry, tracer_provider, loop_block_seconds=0.1)
    sentinels.append(sentinel)
    # With hogs: the loop thread is also descheduled now and then; that is not a block.
    with cpu_hogs(hogs), serve(app, loop=loop) as base:
        asyncio.run(healthy_load(base))
        time.sleep(0.3)  # let any late watchdog verdict arrive
    assert sentinel.findings() == []
    assert sample(registry, "asyncsentinel_findings_total", kind="event_loop_blocked") == 0
    # The monitor was running: the heartbeat measured lag all along.
    assert sample(registry, "asyncsentinel_event_loop_lag_seconds_count") > 10


@pytest.mark.e2e
def test_gc_pause_is_measured_but_not_blamed_on_a_line(
    registry: CollectorRegistry, tracer_provider: Any, sentinels: list[Sentinel]
) -> None:
    app = FastAPI()

    @app.get("/collect")
    async def collect() -> dict[str, int]:
        return {"collected": gc.collect()}

    sentinel = instrumented(app, registry, tracer_provider, loop_block_seconds=0.05)
    sentinels.append(sentinel)

    class Node:
        __slots__ = ("__weakref__", "other")

    with serve(app) as base:
        gc.disable()
        try:
            for _ in range(700_000):  # ~1.4 million objects in reference cycles
                a, b = Node(), Node()
                a.other, b.other = b, a
            del a, b
            assert httpx.get(f"{base}/collect", timeout=30).json()["collected"] > 1_000_000
        finally:
            gc.enable()
        # The pause is measured (outside any route: it is no route's doing)...
        wait_for(
            lambda: sample(
                registry, "asyncsentinel_event_loop_blocked_seconds_count", http_route=""
            )
        )
        time.sleep(0.2)
    assert sample(registry, "asyncsentinel_event_loop_blocked_seconds_sum", http_route="") >= 0.05
    # ... but no line is blamed for it.
    assert sentinel.findings() == []
    assert sample(registry, "asyncsentinel_findings_total", kind="event_loop_blocked") == 0


def test_standalone_monitor_reports_a_block_outside_requests(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry
) -> None:
    sentinel = make_sentinel(**QUIET, loop_monitor=False, task_tracking=False)

    async def main() -> None:
        async with LoopMonitor(sentinel, block_seconds=0.1, heartbeat_seconds=0.02) as monitor:
            assert monitor.running
            await asyncio.sleep(0.1)
            time.sleep(BLOCK)  # BLOCK:standalone
            await asyncio.sleep(0.1)
            await asyncio.to_thread(time.sleep, BLOCK)  # healthy: the loop keeps running
            wait = asyncio.get_running_loop().run_in_executor(
                None, wait_for, lambda: sentinel.findings(EVENT_LOOP_BLOCKED)
            )
            await wait
        assert not monitor.running

    asyncio.run(main())
    [finding] = sentinel.findings(EVENT_LOOP_BLOCKED)
    assert finding.culprit is not None
    assert (finding.culprit.filename, finding.culprit.lineno) == (
        THIS_FILE,
        line_of("BLOCK:standalone"),
    )
    assert finding.http_route == ""
    assert sample(registry, "asyncsentinel_event_loop_blocked_seconds_count", http_route="") == 1
    assert not any(t.name == "asyncsentinel-loop-watchdog" for t in threading.enumerate())


def test_block_just_over_the_threshold_right_after_a_heartbeat_is_reported(
    make_sentinel: Callable[..., Sentinel],
) -> None:
    sentinel = make_sentinel(**QUIET, loop_monitor=False, task_tracking=False)

    async def main() -> None:
        async with LoopMonitor(sentinel, block_seconds=0.1, heartbeat_seconds=0.025) as monitor:

            async def serve_something() -> None:  # a loop at work, not in idle mode
                while True:
                    await asyncio.sleep(0.002)
                    sum(range(2000))

            busy = asyncio.create_task(serve_something())
            for _ in range(3):
                await asyncio.sleep(0.15)
                beat = monitor._beat
                while monitor._beat is beat:  # until the next heartbeat has just run
                    await asyncio.sleep(0)
                # 110 ms from right after a heartbeat: timed from the middle of the heartbeat
                # interval, it would look like 97.5 ms, under the threshold.
                time.sleep(0.11)  # BLOCK:after-beat
            await asyncio.sleep(0.2)
            busy.cancel()

    asyncio.run(main())
    found = sentinel.findings(EVENT_LOOP_BLOCKED)
    # Each block is reported when the watchdog sampled it (it wakes 75 ms after the heartbeat:
    # on a loaded host it may oversleep the 35 ms left), and never timed short.
    assert found
    for finding in found:
        assert finding.culprit is not None
        assert finding.culprit.lineno == line_of("BLOCK:after-beat")
        assert finding.evidence["blocked_seconds"] >= 0.11


def test_monitor_stops_cleanly_and_removes_its_gc_callback(
    make_sentinel: Callable[..., Sentinel],
) -> None:
    sentinel = make_sentinel(**QUIET)
    before = list(gc.callbacks)

    async def main() -> None:
        monitor = LoopMonitor(sentinel)
        monitor.start()
        await asyncio.sleep(0.05)
        assert len(gc.callbacks) == len(before) + 1
        monitor.stop()
        monitor.stop()  # idempotent

    asyncio.run(main())
    assert gc.callbacks == before


def test_invalid_threshold_names_the_setting(make_sentinel: Callable[..., Sentinel]) -> None:
    with pytest.raises(asyncsentinel.ConfigError, match="loop_block_seconds"):
        LoopMonitor(make_sentinel(**QUIET), block_seconds=0)


# --- the vote that picks the culprit among stack samples (pure function) -------------------------
def _sample(filename: str, function: str, line: int) -> StackSample:
    loc = Location(filename, line, function)
    return StackSample((loc,), loc, None, "")


samples_strategy = st.lists(
    st.builds(
        _sample,
        st.sampled_from(["/app/a.py", "/app/b.py"]),
        st.sampled_from(["f", "g", "h"]),
        st.integers(1, 4),
    ),
    min_size=1,
    max_size=40,
)


@given(samples_strategy)
def test_dominant_sample_is_from_the_most_sampled_function(samples: list[StackSample]) -> None:
    result = dominant_sample(samples)
    assert result is not None
    chosen, agreeing = result
    assert chosen in samples
    per_function: dict[tuple[str, str], int] = {}
    for s in samples:
        assert s.culprit is not None
        key = (s.culprit.filename, s.culprit.function)
        per_function[key] = per_function.get(key, 0) + 1
    assert chosen.culprit is not None
    assert agreeing == per_function[(chosen.culprit.filename, chosen.culprit.function)]
    assert agreeing == max(per_function.values())
    same_function = [
        s
        for s in samples
        if s.culprit is not None
        and s.culprit.function == chosen.culprit.function
        and s.culprit.filename == chosen.culprit.filename
    ]
    lines = [s.culprit.lineno for s in same_function if s.culprit is not None]
    assert lines.count(chosen.culprit.lineno) == max(lines.count(n) for n in set(lines))


def test_dominant_sample_prefers_the_long_block_over_a_brief_one() -> None:
    brief = [_sample("/app/a.py", "warmup", 3)]
    long = [_sample("/app/a.py", "crunch", 10 + i % 2) for i in range(9)]
    chosen, agreeing = dominant_sample(brief + long) or (None, 0)
    assert chosen is not None and chosen.culprit is not None
    assert chosen.culprit.function == "crunch"
    assert agreeing == 9
    assert dominant_sample([]) is None


def test_dominant_sample_ignores_a_last_sample_taken_after_the_block_ended() -> None:
    # A CPU-bound loop thread hands the watchdog the GIL up to 5 ms late: if the block ended
    # meanwhile, the last sample shows what ran next (here library code, or the next line).
    blocking = _sample("/app/a.py", "crunch", 10)
    after = StackSample((Location("/lib/starlette/routing.py", 1, "f"),), None, None, "")
    for tail in (after, _sample("/app/a.py", "crunch", 14), _sample("/app/a.py", "respond", 3)):
        chosen, agreeing = dominant_sample([blocking, tail]) or (None, 0)
        assert chosen is blocking
        assert agreeing == (2 if tail.culprit and tail.culprit.function == "crunch" else 1)


def test_stack_sample_tells_a_thread_running_python_from_one_waiting_in_a_call() -> None:
    stop = threading.Event()

    def compute() -> None:
        acc = 0
        while not stop.is_set():
            acc = (acc * 31 + 7) % 1_000_003  # BLOCK:thread-cpu

    def wait() -> None:
        stop.wait()  # BLOCK:thread-wait

    threads = [threading.Thread(target=f, daemon=True) for f in (compute, wait)]
    for t in threads:
        t.start()
    try:
        taken: dict[str, list[StackSample]] = {"compute": [], "wait": []}
        for _ in range(20):
            time.sleep(0.002)
            frames = sys._current_frames()
            for t, key in zip(threads, taken, strict=True):
                assert t.ident is not None
                got = stack_sample(frames.get(t.ident), 0, None, key, 0)
                assert got is not None and got.culprit is not None
                taken[key].append(got)
    finally:
        stop.set()
        for t in threads:
            t.join()
    # The computing thread hands the GIL over between bytecodes; the other sits in a call.
    assert sum(s.in_bytecode for s in taken["compute"]) > 10
    assert not any(s.in_bytecode for s in taken["wait"])
    assert {s.culprit.lineno for s in taken["wait"] if s.culprit} == {line_of("BLOCK:thread-wait")}


# --- judging a stall (pure function): what is and is not the running line's doing ----------------
MS = 1_000_000
USER = Location("/app/handlers.py", 12, "handler")
_REQUEST = RequestState("GET", {}, lambda scope: "/items")


def _late(
    blocked_ms: int,
    *,
    cpu_ms: int = 0,
    wait_ms: int | None = None,
    gc_ms: int = 0,
    paused: bool = False,
) -> LateBeat:
    # Previous beat at 0, due at 25 ms (a busy loop's interval): the block is taken to start
    # right after the previous beat, so it lasted at most until the late beat ran.
    return LateBeat(
        seq=1,
        prev_ran_ns=0,
        due_ns=25 * MS,
        ran_ns=blocked_ms * MS,
        cpu_ns=cpu_ms * MS,
        wait_ns=None if wait_ms is None else wait_ms * MS,
        gc_ns=gc_ms * MS,
        paused=paused,
    )


def _judge(late: LateBeat, samples: list[StackSample], **kwargs: Any) -> Verdict | None:
    return judge(
        late, samples, threshold_ns=100 * MS, epoch_offset_ns=0, tight_ns=25 * MS, **kwargs
    )


def test_judge_blames_the_user_line_of_a_blocking_call() -> None:
    verdict = _judge(_late(500, cpu_ms=2), [_sample(USER.filename, USER.function, 12)] * 5)
    assert verdict is not None and verdict.finding
    assert verdict.culprit == USER
    assert verdict.cause == "blocking_call"
    assert verdict.evidence["blocked_seconds"] == 0.5
    assert verdict.evidence["culprit_samples"] == 5


def test_judge_calls_a_busy_thread_cpu_bound() -> None:
    verdict = _judge(_late(500, cpu_ms=480), [_sample(USER.filename, USER.function, 12)])
    assert verdict is not None and verdict.finding and verdict.cause == "cpu"


def test_judge_does_not_blame_garbage_collection() -> None:
    verdict = _judge(_late(300, gc_ms=250), [_sample(USER.filename, USER.function, 12)])
    assert verdict is not None
    assert not verdict.finding
    assert verdict.cause == "garbage_collection"
    assert verdict.culprit is None
    assert verdict.evidence["collection_during"] == str(USER)


def test_judge_does_not_blame_a_line_for_cpu_starvation() -> None:
    # A 20 ms sleep, then no CPU for 100 ms on an overloaded host: the line is not to blame.
    verdict = _judge(
        _late(125, cpu_ms=1, wait_ms=100), [_sample(USER.filename, USER.function, 12)] * 3
    )
    assert verdict is not None
    assert not verdict.finding  # measured, not reported
    assert verdict.cause == "cpu_starvation"
    assert verdict.evidence["cpu_wait_seconds"] == 0.1
    # 500 ms of a short line mostly queued for a CPU: still not the line's doing.
    verdict = _judge(
        _late(500, cpu_ms=10, wait_ms=440), [_sample(USER.filename, USER.function, 12)]
    )
    assert verdict is not None and not verdict.finding and verdict.cause == "cpu_starvation"


def test_judge_reports_a_cpu_loop_on_a_busy_host_over_the_whole_block() -> None:
    # A 150 ms CPU loop given a quarter of a CPU by a busy host: most of the block queued for a
    # CPU, yet the code held the loop all along. Shares are taken over the whole block, so how
    # little CPU it got near the end (when the watchdog sampled) does not matter.
    verdict = _judge(
        _late(150, cpu_ms=38, wait_ms=110), [_sample(USER.filename, USER.function, 12)] * 2
    )
    assert verdict is not None and verdict.finding
    assert verdict.cause == "cpu"
    assert verdict.culprit == USER
    assert verdict.evidence["blocked_seconds"] == 0.15


def test_judge_calls_a_cpu_loop_sharing_the_gil_with_other_threads_cpu_bound() -> None:
    # Two other threads of the process compute too: the loop thread holds the GIL a third of
    # the time and sleeps waiting for it otherwise, so it is on a CPU for only a third of the
    # block; the samples find it at a different place each time: it was computing.
    computing = [
        dataclasses.replace(_sample(USER.filename, USER.function, 12), in_bytecode=i % 5 != 4)
        for i in range(10)
    ]
    verdict = _judge(_late(1500, cpu_ms=500, wait_ms=100), computing)
    assert verdict is not None and verdict.finding and verdict.cause == "cpu"
    # In a blocking call the samples find it at the call (a last one may come as the block
    # ended, wherever the thread went on).
    waiting = [*computing[:1], *(_sample(USER.filename, USER.function, 12) for _ in range(4))]
    verdict = _judge(_late(1500, cpu_ms=200, wait_ms=100), waiting)
    assert verdict is not None and verdict.finding and verdict.cause == "blocking_call"


def test_judge_reports_a_block_just_over_the_threshold_that_began_right_after_a_heartbeat() -> None:
    # 105 ms from the previous beat (at 0) to the late one: taking the start as the middle of
    # the 25 ms beat interval would judge it a 92.5 ms block; the loop was last known alive at
    # 0, so the block is timed from there and reported.
    verdict = _judge(_late(105), [_sample(USER.filename, USER.function, 12)] * 2)
    assert verdict is not None and verdict.finding
    assert verdict.blocked_seconds == 0.105
    assert verdict.evidence["start_uncertainty_seconds"] == 0.025


def test_judge_times_a_block_in_a_request_from_the_request_start() -> None:
    # The request started 20 ms after the previous beat; its code blocked: the block began then.
    in_request = [
        dataclasses.replace(_sample(USER.filename, USER.function, 12), request=_REQUEST, alive_ns=a)
        for a in (20 * MS, 20 * MS, 111 * MS)  # the last was read just after the block ended
    ]
    verdict = _judge(_late(125), in_request)
    assert verdict is not None and verdict.finding
    assert verdict.blocked_seconds == 0.105
    assert verdict.started_at == 0.02
    assert verdict.evidence["start_uncertainty_seconds"] == 0.005
    assert verdict.request is _REQUEST
    # 110 ms since the previous beat, but only 90 ms since the request started: not reported.
    assert _judge(_late(110), in_request[:2]) is None


def test_judge_splits_a_wide_interval_after_an_idle_spell() -> None:
    # After an idle spell beats are 100 ms apart: a block that began anywhere in that interval
    # is taken to begin in its middle, not inflated by the whole idle interval.
    idle = dataclasses.replace(_late(140), due_ns=100 * MS)
    assert _judge(idle, [_sample(USER.filename, USER.function, 12)]) is None
    verdict = _judge(
        dataclasses.replace(idle, ran_ns=400 * MS), [_sample(USER.filename, USER.function, 12)]
    )
    assert verdict is not None and verdict.finding
    assert verdict.blocked_seconds == 0.35


@given(
    start_ms=st.floats(0, 25),
    block_ms=st.floats(0, 600),
    tail_ms=st.floats(0, 3),
    cpu_bound=st.booleans(),
    request_lead_ms=st.none() | st.floats(0, 5),
)
def test_judge_never_misses_a_block_over_the_threshold_nor_times_it_short(
    start_ms: float, block_ms: float, tail_ms: float, cpu_bound: bool, request_lead_ms: float | None
) -> None:
    # A block that began at start_ms (after the beat at 0, by the one due at 25), ran block_ms,
    # and the late beat ran tail_ms after it; maybe in a request that started just before it.
    ran_ms = start_ms + block_ms + tail_ms
    assume(ran_ms >= 50)  # the heartbeat is only recorded as late from half the threshold on
    sample = _sample(USER.filename, USER.function, 12)
    if request_lead_ms is not None:
        alive = int(max(0.0, start_ms - request_lead_ms) * MS)
        sample = dataclasses.replace(sample, request=_REQUEST, alive_ns=alive)
    late = LateBeat(
        seq=1,
        prev_ran_ns=0,
        due_ns=25 * MS,
        ran_ns=int(ran_ms * MS),
        cpu_ns=int((block_ms if cpu_bound else 0.5) * MS),
        wait_ns=0,
        gc_ns=0,
    )
    verdict = _judge(late, [sample])
    if block_ms >= 100:
        assert verdict is not None and verdict.finding
    if verdict is not None:
        assert verdict.blocked_seconds * 1000 >= block_ms - 1e-6
        slack = 25 if request_lead_ms is None else request_lead_ms
        assert verdict.blocked_seconds * 1000 <= block_ms + tail_ms + slack + 1e-6


def test_judge_measures_but_does_not_report_blocks_without_application_code() -> None:
    library_only = StackSample(
        (Location("/site-packages/fastapi/routing.py", 1, "f"),), None, None, ""
    )
    verdict = _judge(_late(300), [library_only] * 3)
    assert verdict is not None and not verdict.finding


def test_judge_ignores_short_stalls_pauses_and_unsampled_stalls() -> None:
    user = [_sample(USER.filename, USER.function, 12)]
    assert _judge(_late(80), user) is None
    assert _judge(_late(500, paused=True), user) is None
    assert _judge(_late(500), []) is None  # idle in the selector: the host starved the process


@given(
    blocked_ms=st.integers(0, 2000),
    cpu_ms=st.integers(0, 2000),
    gc_ms=st.integers(0, 2000),
    culprits=st.lists(st.booleans(), max_size=6),
)
def test_judge_never_reports_what_is_not_the_lines_doing(
    blocked_ms: int, cpu_ms: int, gc_ms: int, culprits: list[bool]
) -> None:
    samples = [
        _sample(USER.filename, USER.function, 12)
        if is_user
        else StackSample((Location("/lib/x.py", 1, "x"),), None, None, "")
        for is_user in culprits
    ]
    verdict = _judge(
        _late(blocked_ms, cpu_ms=min(cpu_ms, blocked_ms), gc_ms=min(gc_ms, blocked_ms)), samples
    )
    if verdict is not None and verdict.finding:
        assert verdict.culprit is not None
        assert blocked_ms - min(gc_ms, blocked_ms) >= 100
        assert min(gc_ms, blocked_ms) * 2 < blocked_ms
    if blocked_ms < 100:
        assert verdict is None


def test_monitor_left_running_on_a_closed_loop_releases_itself(
    make_sentinel: Callable[..., Sentinel],
) -> None:
    sentinel = make_sentinel(**QUIET)
    before = list(gc.callbacks)
    monitor = LoopMonitor(sentinel, heartbeat_seconds=0.01)

    async def main() -> None:
        monitor.start()
        await asyncio.sleep(0.05)

    asyncio.run(main())  # the loop closes with the monitor still started
    wait_for(lambda: not monitor.running)
    assert gc.callbacks == before
    wait_for(
        lambda: not any(t.name == "asyncsentinel-loop-watchdog" for t in threading.enumerate())
    )
