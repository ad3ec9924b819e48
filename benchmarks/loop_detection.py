"""Detection quality of blocked-event-loop monitors: recall, false reports, culprit line, delay.

A FastAPI app runs under uvicorn (httptools) in its own process, on the asyncio loop or uvloop,
with one detector installed; this process drives it over 127.0.0.1:

* **background load** — a few keep-alive connections request healthy routes in a loop (JSON,
  ``await asyncio.sleep``, ``asyncio.to_thread``, a sync ``def`` route in the thread pool, a
  ~2 ms computation). None of them blocks the loop for long; a report there is a false one.
* **injected blocks** — one at a time, separated by a random pause, the app is told to block its
  loop for a random 50-500 ms with one of three kinds of call: ``time.sleep``, a pure-CPU loop, or
  a blocking ``recv`` on a socket to a server in this process that answers after that delay.
  Each block runs at one of four sites — inline in the route handler, in a sync helper two calls
  below it, in a Starlette background task, or in a long-lived worker task started by the
  lifespan (outside any request) — and so on one known source line per (site, kind), marked
  ``# inject: <site> <kind>`` below (both lines of the CPU loop carry the marker: a sample may
  land on either). The app records when each block started and ended (``time.time()``).

Every detector gets the same seeded schedule. Its reports are collected inside the app and
matched to blocks by time: a report whose interval overlaps a block's (±50 ms) detects it; a
report matching no block is a false positive. For each detector the suite reports recall of the
blocks at or over 100 ms (asyncsentinel's default threshold) and over the detector's own
threshold, false positives, how often the first report's culprit ``file:line`` is the injected
line, the delay from the block's end to that report, how far the duration it reported is from the
block's (for the detectors that report one), and how many blocks under 100 ms it reported.
``--block-ms 80,130`` draws every block near the threshold instead of from 50-500 ms, where a
start estimate that is off by a few milliseconds shows.

Detectors (each read from its own code and used as its README says):

* ``asyncsentinel`` — ``asyncsentinel.instrument(app, registry=CollectorRegistry())`` at default
  settings; reports = ``sentinel.findings("event_loop_blocked")``; culprit = the finding's
  culprit (scored as named, no post-processing). Also run under uvloop.
* ``aiocop`` — ``patch_audit_functions()``, ``start_blocking_io_detection()``,
  ``detect_slow_tasks(threshold_ms=100, on_slow_task=...)``, ``activate()`` in the lifespan.
  Reports = events with ``exceeded_threshold``; the others (blocking-I/O events of callbacks under
  the threshold, which aiocop also emits) are counted apart. Culprit = the innermost frame in the
  app's module of the heaviest blocking event's trace, or of its hottest CPU stack sample.
* ``blockbuster`` — ``BlockBuster().activate()`` in the lifespan: it raises ``BlockingError`` from
  the blocking call instead of reporting, so the request fails. Every ``BlockingError`` raised is
  a report (at the moment it was raised); culprit = innermost frame in the app's module of its
  traceback. It does not see CPU loops by design.
* ``pyleak`` — ``no_event_loop_blocking(action="log", logger=...)`` opened in the lifespan, at its
  real defaults ``threshold=0.2, check_interval=0.05``, and again at ``threshold=0.1,
  check_interval=0.01`` (the values its README gives). Reports = its "Event loop blocked" log
  records; culprit = innermost frame in the app's module of the block's stack. It merges a block
  into the previous one when the two stacks are identical (same site and kind twice in a row),
  so such a block gets no report of its own.
* ``asyncio-debug`` — ``loop.set_debug(True)`` in the lifespan (uvicorn runs its loop with
  ``debug=False``, overriding ``PYTHONASYNCIODEBUG=1``, which is set too),
  ``slow_callback_duration`` 0.1 s; reports = its
  "Executing <handle> took N seconds" log records; culprit = the ``running at file:line`` in the
  handle's text (the task's coroutine, which is all it names).

For the peers that report a whole stack, taking its innermost frame in the app's module is a
generous reading (what a user who knows which file is theirs would do); asyncsentinel is scored on
the one culprit it names. Figures come from a shared 2-core machine with other jobs running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastapi import BackgroundTasks, FastAPI

import common

DESCRIPTION = __doc__.splitlines()[0]
APP_FILE = str(Path(__file__).resolve())
THRESHOLD = 0.1  # asyncsentinel's default loop_block_seconds; checked against Settings at start
MATCH_TOLERANCE = 0.05
SITES = ("handler", "helper", "background", "worker")
KINDS = ("sleep", "cpu", "socket")
TIMED_DETECTORS = ("asyncsentinel", "aiocop", "asyncio-debug")  # they report a block's duration
PACKAGES = (
    "asyncsentinel",
    "aiocop",
    "blockbuster",
    "pyleak",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
)
SOURCE_FILES = (
    "sources/loop.py",
    "sources/loop_watchdog.py",
    "sources/loop_judge.py",
    "frames.py",
    "sources/_task_requests.py",
)
"""The asyncsentinel files this suite measures (their digests go into the JSON)."""


@dataclass(frozen=True)
class Scenario:
    """One detector on one event loop."""

    name: str
    detector: str
    loop: str
    threshold: float  # the detector's own threshold (0: not time-based)
    options: tuple[tuple[str, float], ...] = ()
    env: tuple[tuple[str, str], ...] = ()


SCENARIOS = (
    Scenario("asyncsentinel", "asyncsentinel", "asyncio", THRESHOLD),
    Scenario("asyncsentinel (uvloop)", "asyncsentinel", "uvloop", THRESHOLD),
    Scenario("aiocop", "aiocop", "asyncio", 0.1, (("threshold_ms", 100),)),
    Scenario("blockbuster", "blockbuster", "asyncio", 0.0),
    Scenario(
        "pyleak (defaults 0.2/0.05)",
        "pyleak",
        "asyncio",
        0.2,
        (("threshold", 0.2), ("check_interval", 0.05)),
    ),
    Scenario(
        "pyleak (0.1/0.01)",
        "pyleak",
        "asyncio",
        0.1,
        (("threshold", 0.1), ("check_interval", 0.01)),
    ),
    Scenario("asyncio debug", "asyncio-debug", "asyncio", 0.1, (), (("PYTHONASYNCIODEBUG", "1"),)),
)


# =============================================================================================
# The application (runs in the server process)
# =============================================================================================


def _frame_in_app(frames: Sequence[tuple[str, int, str]]) -> dict[str, Any] | None:
    """The innermost of *frames* (outermost first) in this module, as a culprit dict."""
    for filename, line, function in reversed(frames):
        # A plain comparison: the server runs this file by its absolute path, and blockbuster
        # counts os.path.abspath as a blocking call.
        if filename == APP_FILE:
            return {"file": APP_FILE, "line": line, "function": function}
    return None


def _traceback_frames(tb: TracebackType | None) -> list[tuple[str, int, str]]:
    frames = []
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno, tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    return frames


class Collector:
    """Ground truth (injected blocks) and the detector's reports, kept in the server process."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.truth: dict[int, dict[str, Any]] = {}
        self.done: dict[int, asyncio.Event] = {}
        self.incidents: list[dict[str, Any]] = []
        self.below_threshold_reports: list[dict[str, Any]] = []
        self.sentinel: Any = None
        self.measurements: _BlockedSeconds | None = None
        self.pyleak_context: Any = None
        self.pyleak_records: list[tuple[float, str]] = []

    # --- ground truth -------------------------------------------------------------------------
    @contextlib.contextmanager
    def block(
        self, inj_id: int, site: str, kind: str, seconds: float, sock: socket.socket | None
    ) -> Iterator[None]:
        """Record when the enclosed blocking line started and ended (and what it raised)."""
        record: dict[str, Any] = {
            "id": inj_id,
            "site": site,
            "kind": kind,
            "requested": seconds,
            "error": None,
        }
        self.truth[inj_id] = record
        record["started"] = time.time()
        try:
            yield
        except BaseException as exc:
            record["error"] = repr(exc)
            if self.scenario.detector == "blockbuster" and type(exc).__name__ == "BlockingError":
                self._blockbuster_report(exc)
            raise
        finally:
            record["ended"] = time.time()
            if sock is not None:
                sock.close()
            self.event(inj_id).set()

    def event(self, inj_id: int) -> asyncio.Event:
        if inj_id not in self.done:
            self.done[inj_id] = asyncio.Event()
        return self.done[inj_id]

    # --- detectors' reports -------------------------------------------------------------------
    def _blockbuster_report(self, exc: BaseException) -> None:
        # Marked on the exception itself: id() values are reused once an exception is freed.
        if getattr(exc, "_bench_reported", False):
            return
        exc._bench_reported = True  # type: ignore[attr-defined]
        frames = _traceback_frames(exc.__traceback__)
        now = time.time()
        self.incidents.append(
            {
                "reported_at": now,
                "start": now,
                "end": now,
                "duration": 0.0,
                "culprit": _frame_in_app(frames),
                "innermost": list(frames[-1]) if frames else None,
                "detail": str(exc),
            }
        )

    def aiocop_event(self, event: Any) -> None:
        now = time.time()
        culprit = None
        traces: list[str] = []
        if event.blocking_events:
            heaviest = max(event.blocking_events, key=lambda e: e["severity"])
            traces.append(heaviest["trace"])
        if event.cpu_stack_samples:
            traces.append(event.cpu_stack_samples[0]["trace"])
        for trace in traces:
            frames = []
            # "path:line:function <- ...", innermost first
            for part in reversed(trace.split(" <- ")):
                location, _, function = part.rpartition(":")
                path, _, line = location.rpartition(":")
                if line.isdigit():
                    frames.append((path, int(line), function))
            culprit = _frame_in_app(frames)
            if culprit is not None:
                break
        report = {
            "reported_at": now,
            "start": now - event.elapsed_ms / 1000,
            "end": now,
            "duration": event.elapsed_ms / 1000,
            "culprit": culprit,
            "detail": f"{event.reason} "
            + "; ".join(e["event"][:80] for e in event.blocking_events[:3]),
        }
        if event.exceeded_threshold:
            self.incidents.append(report)
        else:
            self.below_threshold_reports.append(report)

    def asyncio_debug_record(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        took = re.search(r" took ([0-9.]+) seconds$", message)
        if not message.startswith("Executing ") or took is None:
            return
        duration = float(took.group(1))
        running = re.search(r"running at (\S+?):(\d+)>", message)
        culprit = None
        if running is not None:
            culprit = {"file": running.group(1), "line": int(running.group(2)), "function": ""}
        self.incidents.append(
            {
                "reported_at": record.created,
                "start": record.created - duration,
                "end": record.created,
                "duration": duration,
                "culprit": culprit,
                "detail": message[:300],
            }
        )

    def snapshot(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        incidents = list(self.incidents)
        if self.sentinel is not None:
            incidents = self._asyncsentinel_incidents(extra)
        if self.pyleak_context is not None:
            incidents = self._pyleak_incidents()
        return {
            "truth": sorted(self.truth.values(), key=lambda r: r["id"]),
            "incidents": incidents,
            "below_threshold_reports": len(self.below_threshold_reports),
            "below_threshold_examples": [r["detail"] for r in self.below_threshold_reports[:5]],
            "extra": extra,
        }

    def _asyncsentinel_incidents(self, extra: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for f in self.sentinel.findings("event_loop_blocked"):
            ev = f.evidence
            c = f.culprit
            out.append(
                {
                    "reported_at": f.timestamp,
                    "start": ev.get("started_at"),
                    "end": ev.get("ended_at"),
                    "duration": ev.get("blocked_seconds"),
                    "culprit": (
                        {"file": c.filename, "line": c.lineno, "function": c.function}
                        if c is not None
                        else None
                    ),
                    "route": f.http_route,
                    "detail": f"measured={ev.get('blocked_seconds')} cause={ev.get('cause')} "
                    f"samples={ev.get('samples')} "
                    f"culprit_samples={ev.get('culprit_samples')} "
                    f"cpu_wait={ev.get('cpu_wait_seconds')} gc={ev.get('gc_seconds')}",
                }
            )
        registry = self.sentinel.registry
        measured = errors = 0.0
        for metric in registry.collect():
            for sample in metric.samples:
                if sample.name == "asyncsentinel_event_loop_blocked_seconds_count":
                    measured += sample.value
                if sample.name == "asyncsentinel_instrumentation_errors_total":
                    errors += sample.value
        extra["blocked_histogram_count"] = measured
        if self.measurements is not None:
            extra["blocked_observations"] = self.measurements.observations
        extra["instrumentation_errors"] = errors
        return out

    def _pyleak_incidents(self) -> list[dict[str, Any]]:
        blocks = list(self.pyleak_context.detector.detected_blocks)
        logged = [t for t, msg in self.pyleak_records if msg.startswith("Event loop blocked")]
        out = []
        # One "Event loop blocked" record is logged per new block, in order.
        for block, reported_at in zip(blocks, logged, strict=False):
            stack = block.blocking_stack or []
            frames = [(fs.filename, fs.lineno or 0, fs.name) for fs in stack]
            out.append(
                {
                    "reported_at": reported_at,
                    "start": None,
                    "end": None,
                    # At the first report the loop had been unresponsive for one threshold.
                    "duration": block.threshold,
                    "culprit": _frame_in_app(frames),
                    "detail": f"merged duration {block.duration:.3f}s",
                }
            )
        return out


class _BlockedSeconds:
    """An extra asyncsentinel sink (public ``sinks=`` option) that keeps each blocked-loop
    histogram observation with its time: it tells a block asyncsentinel measured but did not
    report from one it never measured."""

    def __init__(self) -> None:
        self.observations: list[tuple[float, float, str]] = []

    def record(self, instrument: Any, value: float, labels: tuple[str, ...]) -> None:
        if instrument.name == "asyncsentinel_event_loop_blocked_seconds":
            self.observations.append((time.time(), value, labels[0] if labels else ""))

    def set(self, instrument: Any, value: float, labels: tuple[str, ...]) -> None:
        pass


class _ListHandler(logging.Handler):
    def __init__(self, sink: Any) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink(record)


async def _delay_socket(port: int, ms: int) -> socket.socket:
    """A connected socket whose peer answers *ms* ms after this request; set to blocking.

    Connecting and sending are done without blocking the loop, so the one blocking call of a
    socket block is the ``recv`` at the injection site.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"{ms}\n".encode())
    sock.setblocking(True)
    return sock


def _blocking_helper(
    c: Collector, inj_id: int, kind: str, seconds: float, sock: socket.socket | None
) -> int:
    """Site "helper": a sync function two calls below the route handler."""
    acc = 0
    with c.block(inj_id, "helper", kind, seconds, sock):
        if kind == "sleep":
            time.sleep(seconds)  # inject: helper sleep
        elif kind == "cpu":
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:  # inject: helper cpu
                acc = (acc * 31 + 7) % 1_000_003  # inject: helper cpu
        elif sock is not None:
            acc = len(sock.recv(64))  # inject: helper socket
    return acc


def _prepare_helper(
    c: Collector, inj_id: int, kind: str, seconds: float, sock: socket.socket | None
) -> int:
    return _blocking_helper(c, inj_id, kind, seconds, sock)


async def _background_block(
    c: Collector, inj_id: int, kind: str, seconds: float, sock: socket.socket | None
) -> None:
    """Site "background": a Starlette background task, after the response was sent."""
    acc = 0
    with c.block(inj_id, "background", kind, seconds, sock):
        if kind == "sleep":
            time.sleep(seconds)  # inject: background sleep
        elif kind == "cpu":
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:  # inject: background cpu
                acc = (acc * 31 + 7) % 1_000_003  # inject: background cpu
        elif sock is not None:
            acc = len(sock.recv(64))  # inject: background socket
    del acc


async def _worker(c: Collector, queue: asyncio.Queue[tuple[int, str, float, Any]]) -> None:
    """Site "worker": a long-lived task the lifespan started, outside any request."""
    while True:
        inj_id, kind, seconds, sock = await queue.get()
        acc = 0
        try:
            with c.block(inj_id, "worker", kind, seconds, sock):
                if kind == "sleep":
                    time.sleep(seconds)  # inject: worker sleep
                elif kind == "cpu":
                    deadline = time.perf_counter() + seconds
                    while time.perf_counter() < deadline:  # inject: worker cpu
                        acc = (acc * 31 + 7) % 1_000_003  # inject: worker cpu
                elif sock is not None:
                    acc = len(sock.recv(64))  # inject: worker socket
        except Exception:
            pass  # e.g. blockbuster's BlockingError, already recorded; the worker goes on
        del acc


def build_app(scenario: Scenario, collector: Collector, delay_port: int) -> Any:
    """The FastAPI app with *scenario*'s detector installed."""
    options = dict(scenario.options)
    queue: asyncio.Queue[tuple[int, str, float, Any]] = asyncio.Queue()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        worker = asyncio.create_task(_worker(collector, queue))
        async with contextlib.AsyncExitStack() as stack:
            if scenario.detector == "aiocop":
                import aiocop

                aiocop.activate()
                stack.callback(aiocop.deactivate)
            elif scenario.detector == "blockbuster":
                from blockbuster import BlockBuster

                buster = BlockBuster()
                buster.activate()
                stack.callback(buster.deactivate)
            elif scenario.detector == "pyleak":
                from pyleak import no_event_loop_blocking
                from pyleak.base import LeakAction

                logger = logging.getLogger("bench.pyleak")
                logger.propagate = False
                logger.setLevel(logging.WARNING)
                logger.addHandler(
                    _ListHandler(
                        lambda r: collector.pyleak_records.append((r.created, r.getMessage()))
                    )
                )
                ctx = no_event_loop_blocking(
                    action=LeakAction.LOG,
                    logger=logger,
                    threshold=options["threshold"],
                    check_interval=options["check_interval"],
                )
                collector.pyleak_context = await stack.enter_async_context(ctx)
            elif scenario.detector == "asyncio-debug":
                # uvicorn runs its loop with debug=False, overriding PYTHONASYNCIODEBUG, so
                # debug mode is switched on here, as a user of uvicorn has to.
                loop = asyncio.get_running_loop()
                loop.set_debug(True)
                loop.slow_callback_duration = THRESHOLD
            yield
        worker.cancel()

    app = FastAPI(lifespan=lifespan)

    # --- healthy routes: the background load -----------------------------------------------------
    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        return {"item_id": item_id, "ok": True}

    @app.get("/io")
    async def io_route() -> dict[str, Any]:
        await asyncio.sleep(0.005)
        return {"ok": True}

    @app.get("/thread")
    async def thread_route() -> dict[str, Any]:
        await asyncio.to_thread(time.sleep, 0.02)
        return {"ok": True}

    @app.get("/sync")
    def sync_route() -> dict[str, Any]:  # FastAPI runs a def route in its thread pool
        time.sleep(0.01)
        return {"ok": True}

    @app.get("/compute")
    async def compute() -> dict[str, Any]:
        return {"sum": sum(i * i for i in range(20_000))}  # ~2 ms: well under any threshold

    # --- injection sites ------------------------------------------------------------------------
    async def socket_for(kind: str, ms: int) -> socket.socket | None:
        return await _delay_socket(delay_port, ms) if kind == "socket" else None

    @app.get("/inject/handler")
    async def inject_handler(kind: str, ms: int, id: int) -> dict[str, Any]:
        sock = await socket_for(kind, ms)
        seconds = ms / 1000
        acc = 0
        with collector.block(id, "handler", kind, seconds, sock):
            if kind == "sleep":
                time.sleep(seconds)  # inject: handler sleep
            elif kind == "cpu":
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:  # inject: handler cpu
                    acc = (acc * 31 + 7) % 1_000_003  # inject: handler cpu
            elif sock is not None:
                acc = len(sock.recv(64))  # inject: handler socket
        return {"acc": acc}

    @app.get("/inject/helper")
    async def inject_helper(kind: str, ms: int, id: int) -> dict[str, Any]:
        sock = await socket_for(kind, ms)
        return {"acc": _prepare_helper(collector, id, kind, ms / 1000, sock)}

    @app.get("/inject/background")
    async def inject_background(
        kind: str, ms: int, id: int, background: BackgroundTasks
    ) -> dict[str, Any]:
        sock = await socket_for(kind, ms)
        background.add_task(_background_block, collector, id, kind, ms / 1000, sock)
        return {"queued": id}

    @app.get("/inject/worker")
    async def inject_worker(kind: str, ms: int, id: int) -> dict[str, Any]:
        sock = await socket_for(kind, ms)
        queue.put_nowait((id, kind, ms / 1000, sock))
        return {"queued": id}

    # --- control --------------------------------------------------------------------------------
    @app.get("/_wait/{inj_id}")
    async def wait_done(inj_id: int) -> dict[str, Any]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collector.event(inj_id).wait(), 15)
        return {"done": collector.event(inj_id).is_set()}

    @app.get("/_results")
    async def results() -> dict[str, Any]:
        return collector.snapshot()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True}

    return app


class _Catching:
    """Outermost ASGI wrapper: sees every exception the app raises (blockbuster's errors)."""

    def __init__(self, app: Any, collector: Collector) -> None:
        self.app = app
        self.collector = collector

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            if type(exc).__name__ == "BlockingError":
                self.collector._blockbuster_report(exc)
            raise


def serve(scenario: Scenario, delay_port: int) -> None:
    """Server process: install the detector, serve the app, print the port on stdout."""
    import uvicorn

    collector = Collector(scenario)
    if scenario.detector == "aiocop":
        import aiocop

        aiocop.patch_audit_functions()
        aiocop.start_blocking_io_detection(trace_depth=20)
        aiocop.detect_slow_tasks(
            threshold_ms=int(dict(scenario.options)["threshold_ms"]),
            on_slow_task=collector.aiocop_event,
        )
    if scenario.detector == "asyncio-debug":
        logging.getLogger("asyncio").addHandler(_ListHandler(collector.asyncio_debug_record))
    if scenario.detector == "blockbuster":
        # Errors uvicorn or asyncio caught and logged (outside the request path) count too.
        def from_log(record: logging.LogRecord) -> None:
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None and type(exc).__name__ == "BlockingError":
                collector._blockbuster_report(exc)

        logging.getLogger().addHandler(_ListHandler(from_log))
    app = build_app(scenario, collector, delay_port)
    if scenario.detector == "asyncsentinel":
        from prometheus_client import CollectorRegistry

        import asyncsentinel

        # Its findings are logged as WARNING records too (default); keep them off stderr.
        logging.getLogger("asyncsentinel").addHandler(logging.NullHandler())
        collector.measurements = _BlockedSeconds()
        collector.sentinel = asyncsentinel.instrument(
            app, registry=CollectorRegistry(), sinks=[collector.measurements]
        )
    asgi = _Catching(app, collector) if scenario.detector == "blockbuster" else app
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the listening
    # socket says so; with proto 0 every response waits ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(
        asgi,
        loop=scenario.loop,
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    uvicorn.Server(config).run(sockets=[sock])


# =============================================================================================
# The driver (this process): delay server, load, injections, scoring
# =============================================================================================


@dataclass(frozen=True)
class Injection:
    """One planned block."""

    id: int
    site: str
    kind: str
    ms: int
    gap: float  # pause before it


def plan(
    blocks: int, seed: int, gap: tuple[float, float], block_ms: tuple[int, int] = (50, 500)
) -> list[Injection]:
    """A seeded schedule: every (site, kind) pair equally often, in random order."""
    rng = random.Random(seed)
    pairs = [(s, k) for s in SITES for k in KINDS]
    chosen = (pairs * (blocks // len(pairs) + 1))[:blocks]
    rng.shuffle(chosen)
    return [
        Injection(i, site, kind, rng.randint(*block_ms), round(rng.uniform(*gap), 3))
        for i, (site, kind) in enumerate(chosen)
    ]


def expected_lines() -> dict[tuple[str, str], set[int]]:
    """Line numbers of the injected blocking lines, from their ``# inject:`` markers."""
    found: dict[tuple[str, str], set[int]] = defaultdict(set)
    marker = re.compile(r"#\s*inject: (\w+) (\w+)\s*$")
    for number, text in enumerate(Path(APP_FILE).read_text().splitlines(), start=1):
        m = marker.search(text)
        if m:
            found[(m.group(1), m.group(2))].add(number)
    missing = {(s, k) for s in SITES for k in KINDS} - set(found)
    assert not missing, f"injection markers missing for {missing}"
    return dict(found)


async def _delay_server() -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            await asyncio.sleep(int(line) / 1000)
            writer.write(b"ok\n")
            await writer.drain()
        except (OSError, ValueError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, bytes]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise ConnectionError("response without content-length")
    return status, await reader.readexactly(length)


async def fetch(port: int, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
    """One request on a fresh connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(_get(reader, writer, path), timeout)
    finally:
        writer.close()


class Load:
    """Keep-alive connections requesting healthy routes, each pausing 0-10 ms between requests."""

    ROUTES = (("/items/7", 5), ("/io", 2), ("/thread", 1), ("/sync", 1), ("/compute", 1))

    def __init__(self, port: int, connections: int, seed: int) -> None:
        self.port = port
        self.connections = connections
        self.rng = random.Random(seed)
        self.requests = 0
        self.errors: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.started = self.stopped = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.connections)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.stopped = time.monotonic()

    async def _client(self) -> None:
        paths = [p for p, w in self.ROUTES for _ in range(w)]
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError as exc:
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.1)
                continue
            try:
                while not self._stop.is_set():
                    status, _ = await asyncio.wait_for(
                        _get(reader, writer, self.rng.choice(paths)), 30
                    )
                    self.requests += 1
                    if status != 200:
                        self.errors[f"HTTP {status}"] += 1
                    await asyncio.sleep(self.rng.uniform(0, 0.01))
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                self.errors[type(exc).__name__] += 1
            finally:
                writer.close()


async def run_scenario(
    scenario: Scenario,
    schedule: Sequence[Injection],
    delay_port: int,
    *,
    connections: int,
    warmup: float,
    seed: int,
) -> dict[str, Any]:
    """Start the server with *scenario*'s detector, drive load and injections, collect reports."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    env.update(scenario.env)
    with tempfile.TemporaryFile() as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            APP_FILE,
            "--serve",
            scenario.name,
            "--delay-port",
            str(delay_port),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line.startswith(b"PORT "):
                raise RuntimeError(f"server did not start: {line!r}")
            port = int(line.split()[1])
            for _ in range(300):
                with contextlib.suppress(OSError):
                    if (await fetch(port, "/healthz", 5))[0] == 200:
                        break
                await asyncio.sleep(0.1)
            load = Load(port, connections, seed)
            load.start()
            await asyncio.sleep(warmup)
            inject_status: Counter[int] = Counter()
            for inj in schedule:
                await asyncio.sleep(inj.gap)
                status, _ = await fetch(
                    port, f"/inject/{inj.site}?kind={inj.kind}&ms={inj.ms}&id={inj.id}"
                )
                inject_status[status] += 1
                await fetch(port, f"/_wait/{inj.id}")
            await asyncio.sleep(1.5)  # let late reports arrive
            await load.stop()
            status, body = await fetch(port, "/_results")
            if status != 200:
                raise RuntimeError(f"/_results answered {status}: {body[:500]!r}")
            results = json.loads(body)
            results["load"] = {
                "connections": connections,
                "requests": load.requests,
                "requests_per_second": round(load.requests / (load.stopped - load.started), 1),
                "errors": dict(load.errors),
            }
            results["injection_http_status"] = {str(k): v for k, v in sorted(inject_status.items())}
            return results
        except BaseException:
            stderr.seek(0)
            sys.stderr.write(stderr.read()[-4000:].decode(errors="replace"))
            raise
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def _interval(inc: dict[str, Any]) -> tuple[float, float]:
    start, end = inc.get("start"), inc.get("end")
    if start is not None and end is not None:
        return float(start), float(end)
    end = float(end if end is not None else inc["reported_at"])
    return end - float(inc.get("duration") or 0.0), end


def _pct(n: int, d: int) -> float | None:
    return round(100.0 * n / d, 1) if d else None


def score(
    scenario: Scenario,
    results: dict[str, Any],
    lines: dict[tuple[str, str], set[int]],
) -> dict[str, Any]:
    """Match reports to injected blocks and compute the detection figures."""
    blocks = []
    for t in results["truth"]:
        if "ended" not in t:
            continue
        prevented = t["error"] is not None
        duration = t["ended"] - t["started"]
        blocks.append(
            {
                **t,
                "duration": t["requested"] if prevented else duration,
                "prevented": prevented,
                "reports": [],
            }
        )
    false_positives = []
    for inc in sorted(results["incidents"], key=lambda i: i["reported_at"]):
        s, e = _interval(inc)
        best, best_overlap = None, -1.0
        for b in blocks:
            overlap = min(e, b["ended"] + MATCH_TOLERANCE) - max(s, b["started"] - MATCH_TOLERANCE)
            if overlap >= 0 and overlap > best_overlap:
                best, best_overlap = b, overlap
        if best is None:
            false_positives.append(inc)
        else:
            best["reports"].append(inc)

    def culprit_ok(b: dict[str, Any]) -> bool:
        c = b["reports"][0]["culprit"] if b["reports"] else None
        return (
            c is not None
            and os.path.abspath(c["file"]) == APP_FILE
            and c["line"] in lines[(b["site"], b["kind"])]
        )

    over = [b for b in blocks if b["duration"] >= THRESHOLD]
    own = [b for b in blocks if b["duration"] >= scenario.threshold]
    detected = [b for b in over if b["reports"]]
    delays = [b["reports"][0]["reported_at"] - b["ended"] for b in detected]
    # How far the duration a detector reported is from the block's (every block it reported,
    # under the threshold too): a start estimate that is too early inflates it. Only for the
    # detectors that measure one (pyleak reports its threshold, blockbuster nothing).
    errors = sorted(
        1000 * (float(b["reports"][0]["duration"]) - b["duration"])
        for b in blocks
        if scenario.detector in TIMED_DETECTORS
        and b["reports"]
        and b["reports"][0].get("duration") is not None
    )
    by_kind: dict[str, dict[str, Any]] = {}
    for key, group in (("kind", KINDS), ("site", SITES)):
        for value in group:
            sel = [b for b in over if b[key] == value]
            det = [b for b in sel if b["reports"]]
            by_kind[f"{key}={value}"] = {
                "blocks": len(sel),
                "recall_pct": _pct(len(det), len(sel)),
                "culprit_ok_pct": _pct(sum(culprit_ok(b) for b in det), len(det)),
            }
    observations = results.get("extra", {}).get("blocked_observations")

    def measured(b: dict[str, Any]) -> list[float] | None:
        """asyncsentinel's histogram observations just after the block (None: other detector)."""
        if observations is None:
            return None
        return [
            round(v, 4) for t, v, _ in observations if b["ended"] - 0.05 <= t <= b["ended"] + 0.5
        ]

    misses = [
        {
            "id": b["id"],
            "site": b["site"],
            "kind": b["kind"],
            "seconds": round(b["duration"], 3),
            "measured_not_reported": measured(b),
        }
        for b in over
        if not b["reports"]
    ]
    wrong = [
        {
            "id": b["id"],
            "site": b["site"],
            "kind": b["kind"],
            "seconds": round(b["duration"], 3),
            "expected_lines": sorted(lines[(b["site"], b["kind"])]),
            "named": b["reports"][0]["culprit"],
            "detail": b["reports"][0].get("detail", ""),
        }
        for b in detected
        if not culprit_ok(b)
    ]
    route_ok = None
    if scenario.detector == "asyncsentinel":
        expected_route = {
            "handler": "/inject/handler",
            "helper": "/inject/helper",
            "background": "/inject/background",
            "worker": "",
        }
        route_ok = _pct(
            sum(b["reports"][0].get("route") == expected_route[b["site"]] for b in detected),
            len(detected),
        )
    sub = [b for b in blocks if b["duration"] < THRESHOLD]
    delays_sorted = sorted(delays)
    return {
        "scenario": scenario.name,
        "detector": scenario.detector,
        "loop": scenario.loop,
        "own_threshold_seconds": scenario.threshold,
        "blocks_injected": len(blocks),
        "blocks_prevented_by_raising": sum(b["prevented"] for b in blocks),
        "blocks_over_threshold": len(over),
        "detected_over_threshold": len(detected),
        "recall_pct": _pct(len(detected), len(over)),
        "blocks_over_own_threshold": len(own),
        "recall_own_threshold_pct": _pct(sum(bool(b["reports"]) for b in own), len(own)),
        "blocks_under_threshold": len(sub),
        "reported_under_threshold": sum(bool(b["reports"]) for b in sub),
        "reported_under_threshold_blocks": [
            {
                "id": b["id"],
                "site": b["site"],
                "kind": b["kind"],
                "seconds": round(b["duration"], 4),
                "reported_seconds": b["reports"][0].get("duration"),
            }
            for b in sub
            if b["reports"]
        ],
        "duration_error_ms": (
            {
                "median": round(statistics.median(errors), 1),
                "p10": round(errors[int(0.1 * (len(errors) - 1))], 1),
                "p90": round(errors[int(0.9 * (len(errors) - 1))], 1),
                "min": round(errors[0], 1),
                "max": round(errors[-1], 1),
            }
            if errors
            else None
        ),
        "reports": len(results["incidents"]),
        "false_positives": len(false_positives),
        "false_positive_examples": false_positives[:10],
        "duplicate_reports": sum(max(0, len(b["reports"]) - 1) for b in blocks),
        "below_threshold_reports": results.get("below_threshold_reports", 0),
        "below_threshold_examples": results.get("below_threshold_examples", []),
        "culprit_ok": sum(culprit_ok(b) for b in detected),
        "culprit_ok_pct": _pct(sum(culprit_ok(b) for b in detected), len(detected)),
        "route_ok_pct": route_ok,
        "delay_seconds": (
            {
                "median": round(statistics.median(delays), 4),
                "p90": round(delays_sorted[int(0.9 * (len(delays_sorted) - 1))], 4),
                "min": round(min(delays), 4),
                "max": round(max(delays), 4),
            }
            if delays
            else None
        ),
        "breakdown": by_kind,
        "per_block": [
            {
                "id": b["id"],
                "site": b["site"],
                "kind": b["kind"],
                "seconds": round(b["duration"], 4),
                "reports": len(b["reports"]),
                "culprit_ok": culprit_ok(b) if b["reports"] else None,
                "delay": (
                    round(b["reports"][0]["reported_at"] - b["ended"], 4) if b["reports"] else None
                ),
                "detail": b["reports"][0].get("detail", "")[:200] if b["reports"] else "",
            }
            for b in blocks
        ],
        "missed": misses,
        "wrong_culprit": wrong,
        "extra": results.get("extra", {}),
        "load": results.get("load", {}),
        "injection_http_status": results.get("injection_http_status", {}),
    }


def _fmt(v: Any, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v}{suffix}"


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000) + 0:d}"  # + 0: no "-0"


def tables(scores: Sequence[dict[str, Any]]) -> str:
    """The Markdown tables of a run."""
    main = common.markdown_table(
        [
            "detector",
            "recall ≥100 ms",
            "recall ≥ own threshold",
            "false positives",
            "culprit line ok",
            "delay after block end: median (p90, max)",
            "reported minus true duration: median (p90, max)",
            "other reports",
        ],
        [
            [
                s["scenario"],
                f"{_fmt(s['recall_pct'], '%')} ({s['detected_over_threshold']}/"
                f"{s['blocks_over_threshold']})",
                f"{_fmt(s['recall_own_threshold_pct'], '%')} "
                f"(≥{s['own_threshold_seconds'] * 1000:.0f} ms)",
                str(s["false_positives"]),
                f"{_fmt(s['culprit_ok_pct'], '%')} ({s['culprit_ok']}/"
                f"{s['detected_over_threshold']})",
                (
                    f"{_ms(s['delay_seconds']['median'])} ms "
                    f"({_ms(s['delay_seconds']['p90'])}, {_ms(s['delay_seconds']['max'])})"
                    if s["delay_seconds"]
                    else "n/a"
                ),
                (
                    f"{s['duration_error_ms']['median']:+.1f} ms "
                    f"({s['duration_error_ms']['p90']:+.1f}, {s['duration_error_ms']['max']:+.1f})"
                    if s["duration_error_ms"]
                    else "n/a"
                ),
                _other(s),
            ]
            for s in scores
        ],
    )
    kinds = common.markdown_table(
        ["detector", *[f"{k}: recall / culprit" for k in KINDS], "worker site (no request)"],
        [
            [
                s["scenario"],
                *[
                    f"{_fmt(s['breakdown'][f'kind={k}']['recall_pct'], '%')} / "
                    f"{_fmt(s['breakdown'][f'kind={k}']['culprit_ok_pct'], '%')}"
                    for k in KINDS
                ],
                f"{_fmt(s['breakdown']['site=worker']['recall_pct'], '%')} / "
                f"{_fmt(s['breakdown']['site=worker']['culprit_ok_pct'], '%')}",
            ]
            for s in scores
        ],
    )
    return main + "\n\nBy kind of block (blocks ≥100 ms):\n\n" + kinds


def _other(s: dict[str, Any]) -> str:
    parts = []
    if s["duplicate_reports"]:
        parts.append(f"{s['duplicate_reports']} duplicate")
    if s["reported_under_threshold"]:
        parts.append(
            f"{s['reported_under_threshold']} of {s['blocks_under_threshold']} blocks under 100 ms "
            f"reported"
        )
    if s["below_threshold_reports"]:
        parts.append(f"{s['below_threshold_reports']} I/O events under threshold")
    if s["blocks_prevented_by_raising"]:
        failed = sum(v for k, v in s["injection_http_status"].items() if k != "200")
        parts.append(
            f"raised in {s['blocks_prevented_by_raising']} blocks ({failed} injecting requests "
            f"failed)"
        )
    if s["route_ok_pct"] is not None:
        parts.append(f"route named right in {s['route_ok_pct']}%")
    load_errors = sum(s["load"].get("errors", {}).values())
    if load_errors:
        parts.append(f"{load_errors} load errors")
    return "; ".join(parts) or "-"


async def _drive(args: argparse.Namespace, scenarios: Sequence[Scenario]) -> list[dict[str, Any]]:
    lines = expected_lines()
    schedule = plan(args.blocks, args.seed, (args.gap_min, args.gap_max), args.block_ms)
    server = await _delay_server()
    delay_port = server.sockets[0].getsockname()[1]
    scores = []
    try:
        for scenario in scenarios:
            began = time.monotonic()
            load_before = os.getloadavg()
            print(f"## {scenario.name}: {len(schedule)} blocks ...", flush=True)
            # Busy-looping processes: a host whose cores are taken by other work.
            hogs = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.cpu_hogs)
            ]
            try:
                results = await run_scenario(
                    scenario,
                    schedule,
                    delay_port,
                    connections=args.connections,
                    warmup=args.warmup,
                    seed=args.seed,
                )
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
            s = score(scenario, results, lines)
            s["elapsed_seconds"] = round(time.monotonic() - began, 1)
            s["load_average_before_after"] = [
                round(load_before[0], 2),
                round(os.getloadavg()[0], 2),
            ]
            s["schedule_mean_block_ms"] = round(statistics.mean(i.ms for i in schedule), 1)
            scores.append(s)
            print(
                f"   recall {_fmt(s['recall_pct'], '%')}, false positives "
                f"{s['false_positives']}, culprit ok {_fmt(s['culprit_ok_pct'], '%')}, "
                f"reported under threshold {s['reported_under_threshold']}/"
                f"{s['blocks_under_threshold']}, duration error ms {s['duration_error_ms']}, "
                f"load {s['load'].get('requests_per_second')} req/s ({s['elapsed_seconds']} s, "
                f"host load average {s['load_average_before_after']})",
                flush=True,
            )
    finally:
        server.close()
    return scores


def _ms_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    if not low.isdigit() or not high.isdigit() or int(low) > int(high):
        raise argparse.ArgumentTypeError(f"expected MIN,MAX in ms, got {text!r}")
    return int(low), int(high)


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The suite's own options."""
    parser.add_argument("--blocks", type=int, help="blocks per detector (default 100; quick 15)")
    parser.add_argument("--seed", type=int, default=4, help="schedule seed (default 4)")
    parser.add_argument(
        "--detectors",
        help="comma-separated scenario names or detector names (default: all): "
        + ", ".join(s.name for s in SCENARIOS),
    )
    parser.add_argument("--connections", type=int, default=4, help="load connections (4)")
    parser.add_argument(
        "--block-ms",
        type=_ms_range,
        default=(50, 500),
        help="range of block lengths, MIN,MAX in ms (50,500); e.g. 80,130 to look closely at "
        "blocks near the 100 ms threshold",
    )
    parser.add_argument(
        "--cpu-hogs",
        type=int,
        default=0,
        help="busy-looping processes run beside each scenario: a host short of CPU (0)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suite, print the tables, write the JSON; returns the payload."""
    common.require_installed(PACKAGES)
    from asyncsentinel.config import Settings

    assert Settings().loop_block_seconds == THRESHOLD, "asyncsentinel's default threshold moved"
    quick = bool(getattr(args, "quick", False))
    args.blocks = args.blocks or (15 if quick else 100)
    args.gap_min, args.gap_max = (0.15, 0.3) if quick else (0.3, 0.7)
    args.warmup = 1.0 if quick else 2.0
    chosen = list(SCENARIOS)
    if args.detectors:
        wanted = {w.strip() for w in args.detectors.split(",")}
        chosen = [s for s in SCENARIOS if s.name in wanted or s.detector in wanted]
        if not chosen:
            raise SystemExit(f"no scenario matches {args.detectors!r}")
    began = time.monotonic()
    scores = asyncio.run(_drive(args, chosen))
    elapsed = time.monotonic() - began
    text = tables(scores)
    print()
    print(text)
    print(f"\n{len(scores)} scenarios in {elapsed:.0f} s; shared 2-core machine, see the JSON.")
    payload = {
        "suite": "loop_detection",
        "description": DESCRIPTION,
        "machine": common.machine_info(),
        "run": {**common.run_info(), "elapsed_seconds": round(elapsed, 1)},
        "versions": common.package_versions(PACKAGES),
        "asyncsentinel_sources_sha256": common.source_digests(SOURCE_FILES),
        "parameters": {
            "blocks_per_detector": args.blocks,
            "block_ms": list(args.block_ms),
            "gap_seconds": [args.gap_min, args.gap_max],
            "warmup_seconds": args.warmup,
            "load_connections": args.connections,
            "cpu_hogs": args.cpu_hogs,
            "seed": args.seed,
            "threshold_seconds": THRESHOLD,
            "match_tolerance_seconds": MATCH_TOLERANCE,
            "sites": SITES,
            "kinds": KINDS,
        },
        "tables_markdown": text,
        "scores": scores,
    }
    results_dir = Path(getattr(args, "results_dir", None) or common.RESULTS_DIR)
    name = "loop_detection" + (".quick" if quick else "")
    name += f".cpu-hogs-{args.cpu_hogs}" if args.cpu_hogs else ""
    name += ".block-ms-{}-{}".format(*args.block_ms) if tuple(args.block_ms) != (50, 500) else ""
    name += ".partial.json" if args.detectors else ".json"
    path = common.write_json(results_dir / name, payload)
    print(f"results: {path}")
    return payload


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/loop_detection.py [--quick] [options]``."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="15 blocks per detector (~80 s)")
    parser.add_argument("--results-dir", help="directory for the JSON (default benchmarks/results)")
    add_arguments(parser)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--delay-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(next(s for s in SCENARIOS if s.name == args.serve), args.delay_port)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
