"""What the event-loop monitor and task tracking cost: idle CPU, CPU under load, µs per task.

Three measurements, each with the variants interleaved round by round (order rotated per round)
and every figure a median over rounds of a *paired* difference against the baseline measured in
the same round, with its spread. Figures come from a shared 2-core machine where other jobs run:
compare within one run.

* **idle** — an event loop with nothing to do sleeps for a window; the process's CPU time over
  the window (``time.process_time()``: every thread, user + system) as % of one core, for: no
  monitor; ``asyncsentinel.LoopMonitor`` at default settings (heartbeat 25 ms, threshold 100 ms);
  and a whole default ``asyncsentinel.instrument(app)`` with its lifespan started (every default
  source's background work: loop monitor, live-task gauge, thread-pool gauges, ...). On the
  asyncio loop and on uvloop. The CPU time of asyncsentinel's threads (the watchdog) is shown
  apart. Target from the issue: under 0.5% of one core at defaults.
* **under load** — the same variants while the loop serves a paced workload (20 coroutines,
  each waking every 5 ms to do ~0.1 ms of pure-Python work, ~45% of one core) until it has done
  a fixed number of work units: process CPU % of one core, and per round the extra CPU seconds
  against no monitor for the same work, per second of the window. On a shared machine the CPU
  time of the same work varies by tens of percent between rounds, far more than a monitor
  costs, so asyncsentinel's own work is also measured directly: the CPU time of its threads
  (``/proc`` schedstat) plus that of each callback it schedules on the loop (the heartbeat,
  timers), timed on the loop thread's CPU clock by a wrapper on the loop's ``call_soon`` /
  ``call_later`` / ``call_at`` / ``call_soon_threadsafe`` (see
  ``time_asyncsentinel_callbacks``; only under load). At idle the process figure is clean (the
  baseline uses ~0.003% of a core) and includes the cost of waking sleeping threads.
* **per task** — create N tasks of a trivial coroutine and await them (batches of 100, timed
  inside the coroutine that creates them, wall-clock and loop-thread CPU), for: no tracking;
  asyncsentinel's task tracking (``task_tracking`` on, every other detector off) outside any
  request and inside a request (an in-process ASGI request to a FastAPI route that does the
  fan-out, where tracking records each task's creating line); and asyncio debug mode for
  reference. Reported in µs per task.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import asyncsentinel
import common

DESCRIPTION = __doc__.splitlines()[0]
PACKAGES = ("asyncsentinel", "fastapi", "starlette", "uvloop", "prometheus-client")
SOURCE_FILES = (
    "sources/loop.py",
    "sources/loop_watchdog.py",
    "sources/loop_judge.py",
    "sources/tasks.py",
    "sources/_task_requests.py",
)
"""The asyncsentinel files this suite measures (their digests go into the JSON)."""
TARGET_IDLE_PCT = 0.5
ONLY_LOOP_MONITOR = {
    "sqlalchemy": False,
    "loop_monitor": False,
    "task_tracking": False,
    "thread_pool_metrics": False,
    "aiohttp": False,
}
ONLY_TASK_TRACKING = {**ONLY_LOOP_MONITOR, "task_tracking": True}


# --- helpers ---------------------------------------------------------------------------------


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def _threads_cpu_ns(prefix: str = "asyncsentinel") -> int:
    """CPU time of the live threads whose name starts with *prefix* (Linux ``/proc``)."""
    total = 0
    for thread in threading.enumerate():
        if thread.name.startswith(prefix) and thread.native_id is not None:
            try:
                with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass
    return total


def _owned_by_asyncsentinel(callback: Any) -> bool:
    owner = getattr(callback, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(callback, "__module__", "")
    return (module or "").startswith("asyncsentinel")


def time_asyncsentinel_callbacks(loop: asyncio.AbstractEventLoop, total_ns: list[int]) -> None:
    """Time, on the loop thread's CPU clock, every callback asyncsentinel schedules on *loop*.

    Instance attributes shadow the loop's scheduling methods (asyncio and uvloop allow it);
    callbacks whose owner is an asyncsentinel object (the loop monitor's heartbeat, the task
    gauge's timer, ...) are wrapped and their CPU time added to ``total_ns[0]``. This measures
    asyncsentinel's work on a busy loop directly, where the process's CPU time for the same work
    varies by tens of percent from one round to the next on a shared machine.
    """
    for name, position in (
        ("call_soon", 0),
        ("call_soon_threadsafe", 0),
        ("call_later", 1),
        ("call_at", 1),
    ):
        original = getattr(loop, name)

        def patched(*args: Any, _original: Any = original, _at: int = position, **kw: Any) -> Any:
            callback = args[_at]
            if _owned_by_asyncsentinel(callback):

                def timed(*cb_args: Any, _cb: Any = callback) -> Any:
                    began = time.thread_time_ns()
                    try:
                        return _cb(*cb_args)
                    finally:
                        total_ns[0] += time.thread_time_ns() - began

                args = (*args[:_at], timed, *args[_at + 1 :])
            return _original(*args, **kw)

        setattr(loop, name, patched)


class Lifespan:
    """Runs an ASGI app's lifespan protocol as a server does (startup, then shutdown)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"lifespan startup failed: {message}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._to_app.put({"type": "lifespan.shutdown"})
        message = await self._from_app.get()
        if message["type"] != "lifespan.shutdown.complete":
            raise RuntimeError(f"lifespan shutdown failed: {message}")
        if self._task is not None:
            await self._task


def _instrumented_app(**options: Any) -> tuple[FastAPI, Any]:
    app = FastAPI()
    sentinel = asyncsentinel.instrument(app, registry=CollectorRegistry(), **options)
    return app, sentinel


@asynccontextmanager
async def _variant(name: str) -> Any:
    """Install the monitoring of variant *name* on the running loop for the enclosed block."""
    if name == "none":
        yield None
    elif name == "LoopMonitor":
        sentinel = asyncsentinel.Sentinel(registry=CollectorRegistry(), **ONLY_LOOP_MONITOR)
        try:
            async with asyncsentinel.LoopMonitor(sentinel):
                yield sentinel
        finally:
            sentinel.close()
    elif name == "asyncsentinel defaults":
        app, sentinel = _instrumented_app()
        try:
            async with Lifespan(app):
                yield sentinel
        finally:
            sentinel.close()
    else:
        raise ValueError(name)


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in common.summarize(values).items()}


# --- idle and under load ---------------------------------------------------------------------


LOAD_UNITS_PER_SECOND = 3000  # about what 20 coroutines waking every 5 ms get done here


async def _paced_load(units: list[float]) -> None:
    """One of the workload's coroutines: every 5 ms, ~0.1 ms of pure-Python work.

    ``units[0]`` counts work units done by all coroutines; they stop at ``units[1]``.
    """
    while units[0] < units[1]:
        await asyncio.sleep(0.005)
        acc = 0
        for i in range(1500):
            acc = (acc * 31 + i) % 1_000_003
        units[0] += 1


async def _window(variant: str, seconds: float, load: bool) -> dict[str, float]:
    """CPU use over one window with *variant* installed.

    Idle: a window of *seconds*. Under load: the window ends when the workload has done a fixed
    number of units (``LOAD_UNITS_PER_SECOND * seconds``), so every variant does the same work
    and the CPU difference is the monitoring's.
    """
    callbacks_ns = [0]
    if load:
        # Only under load: the wrapper costs ~0.02% of a core at idle, where the process's CPU
        # time is the clean figure anyway.
        time_asyncsentinel_callbacks(asyncio.get_running_loop(), callbacks_ns)
    async with _variant(variant):
        units = [0.0, float("inf")]
        workers = [asyncio.create_task(_paced_load(units)) for _ in range(20)] if load else []
        await asyncio.sleep(0.5)  # settle: thread start, first heartbeats, workload ramp-up
        gc.collect()
        threads0, callbacks0 = _threads_cpu_ns(), callbacks_ns[0]
        units0 = units[0]
        units[1] = units0 + LOAD_UNITS_PER_SECOND * seconds
        wall0, cpu0, loop0 = time.perf_counter(), time.process_time(), time.thread_time()
        if load:
            await asyncio.gather(*workers)
        else:
            await asyncio.sleep(seconds)
        wall = time.perf_counter() - wall0
        cpu, loop_cpu = time.process_time() - cpu0, time.thread_time() - loop0
        threads_ns, own_callbacks_ns = _threads_cpu_ns() - threads0, callbacks_ns[0] - callbacks0
        done = units[0] - units0
    return {
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "cpu_pct": 100 * cpu / wall,
        "loop_thread_pct": 100 * loop_cpu / wall,
        "units_per_second": done / wall,
        "watchdog_pct": 100 * threads_ns / 1e9 / wall,
        "callbacks_pct": 100 * own_callbacks_ns / 1e9 / wall if load else None,
        "own_work_pct": 100 * (threads_ns + own_callbacks_ns) / 1e9 / wall if load else None,
    }


CPU_VARIANTS = (
    ("asyncio", "none"),
    ("asyncio", "LoopMonitor"),
    ("asyncio", "asyncsentinel defaults"),
    ("uvloop", "none"),
    ("uvloop", "LoopMonitor"),
)


def measure_cpu(rounds: int, seconds: float, load: bool) -> dict[str, Any]:
    """Interleaved rounds of every CPU variant; paired differences against "none"."""
    per_variant: dict[str, list[dict[str, float]]] = {f"{lp}/{v}": [] for lp, v in CPU_VARIANTS}
    added: dict[str, list[float]] = {key: [] for key in per_variant}
    keys = list(per_variant)
    for r in range(rounds):
        this_round: dict[str, dict[str, float]] = {}
        for key in common.rotated(keys, r):
            loop, variant = key.split("/", 1)
            with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
                this_round[key] = runner.run(_window(variant, seconds, load))
            per_variant[key].append(this_round[key])
        for key in keys:
            base, got = this_round[f"{key.split('/')[0]}/none"], this_round[key]
            # Same work (load) or same duration (idle): the extra CPU seconds per second.
            added[key].append(
                100 * (got["cpu_seconds"] - base["cpu_seconds"]) / got["wall_seconds"]
            )
        print(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{k} {this_round[k]['cpu_pct']:.2f}%" for k in keys),
            flush=True,
        )
    result: dict[str, Any] = {}
    for key in keys:
        rows = per_variant[key]
        result[key] = {
            "cpu_pct": _spread([x["cpu_pct"] for x in rows]),
            "added_cpu_pct": _spread(added[key]),
            "loop_thread_pct": _spread([x["loop_thread_pct"] for x in rows]),
            "units_per_second": _spread([x["units_per_second"] for x in rows]),
            "watchdog_pct": _spread([x["watchdog_pct"] for x in rows]),
            "callbacks_pct": _spread([x["callbacks_pct"] for x in rows]) if load else None,
            "own_work_pct": _spread([x["own_work_pct"] for x in rows]) if load else None,
            "per_round": rows,
        }
    return result


# --- per task --------------------------------------------------------------------------------


async def _noop() -> None:
    return None


async def fan_out(n: int) -> tuple[int, int]:
    """Create *n* tasks, then await each; (wall ns, loop-thread CPU ns)."""
    wall0, cpu0 = time.perf_counter_ns(), time.thread_time_ns()
    tasks = [asyncio.create_task(_noop()) for _ in range(n)]
    for task in tasks:
        await task
    return time.perf_counter_ns() - wall0, time.thread_time_ns() - cpu0


def _fan_out_app(batch: int, sink: list[tuple[int, int]]) -> FastAPI:
    app = FastAPI()

    @app.get("/fanout")
    async def fanout() -> dict[str, int]:
        sink.append(await fan_out(batch))
        return {"tasks": batch}

    return app


_SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/fanout",
    "raw_path": b"/fanout",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"bench")],
    "client": ("127.0.0.1", 40000),
    "server": ("127.0.0.1", 80),
}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    return None


TASK_VARIANTS = (
    "none",
    "task tracking",
    "none, in a request",
    "task tracking, in a request",
    "asyncio debug mode",
)
_BASELINE = {
    "none": "none",
    "task tracking": "none",
    "asyncio debug mode": "none",
    "none, in a request": "none, in a request",
    "task tracking, in a request": "none, in a request",
}


async def _task_batches(variant: str, batches: int, batch: int) -> list[tuple[int, int]]:
    """Time *batches* fan-outs of *batch* tasks with *variant* installed."""
    results: list[tuple[int, int]] = []
    loop = asyncio.get_running_loop()
    if variant in ("none", "asyncio debug mode"):
        loop.set_debug(variant == "asyncio debug mode")
        try:
            for _ in range(batches):
                results.append(await fan_out(batch))
        finally:
            loop.set_debug(False)
        return results
    if variant == "task tracking":
        sentinel = asyncsentinel.Sentinel(registry=CollectorRegistry(), **ONLY_TASK_TRACKING)
        await sentinel.startup()  # installs the task factory on this loop
        try:
            for _ in range(batches):
                results.append(await fan_out(batch))
        finally:
            await sentinel.shutdown()
            sentinel.close()
        return results
    app = _fan_out_app(batch, results)
    sentinel = None
    asgi: Any = app
    if variant == "task tracking, in a request":
        sentinel = asyncsentinel.instrument(app, registry=CollectorRegistry(), **ONLY_TASK_TRACKING)
    try:
        async with Lifespan(asgi):
            for _ in range(batches):
                await asgi(dict(_SCOPE), _receive, _send)
    finally:
        if sentinel is not None:
            sentinel.close()
    if len(results) != batches:
        raise RuntimeError(f"{variant}: {len(results)} of {batches} requests ran the fan-out")
    return results


def measure_tasks(rounds: int, batches: int, batch: int) -> dict[str, Any]:
    """Interleaved rounds of every task variant; µs per task, paired against its baseline."""
    us: dict[str, list[float]] = {v: [] for v in TASK_VARIANTS}
    cpu_us: dict[str, list[float]] = {v: [] for v in TASK_VARIANTS}
    added: dict[str, list[float]] = {v: [] for v in TASK_VARIANTS}
    added_cpu: dict[str, list[float]] = {v: [] for v in TASK_VARIANTS}

    async def one_round(order: Sequence[str]) -> dict[str, tuple[float, float]]:
        out = {}
        for variant in order:
            gc.collect()
            timed = await _task_batches(variant, batches, batch)
            n = batches * batch
            out[variant] = (
                sum(w for w, _ in timed) / 1e3 / n,
                sum(c for _, c in timed) / 1e3 / n,
            )
        return out

    with asyncio.Runner() as runner:
        runner.run(one_round(TASK_VARIANTS))  # warm-up: imports, first-request route setup
        for r in range(rounds):
            got = runner.run(one_round(common.rotated(list(TASK_VARIANTS), r)))
            for v in TASK_VARIANTS:
                us[v].append(got[v][0])
                cpu_us[v].append(got[v][1])
                added[v].append(got[v][0] - got[_BASELINE[v]][0])
                added_cpu[v].append(got[v][1] - got[_BASELINE[v]][1])
            print(
                f"  round {r + 1}/{rounds}: "
                + ", ".join(f"{v} {got[v][0]:.2f}" for v in TASK_VARIANTS)
                + " µs/task",
                flush=True,
            )
    return {
        v: {
            "baseline": _BASELINE[v],
            "us_per_task": _spread(us[v]),
            "added_us_per_task": _spread(added[v]),
            "cpu_us_per_task": _spread(cpu_us[v]),
            "added_cpu_us_per_task": _spread(added_cpu[v]),
        }
        for v in TASK_VARIANTS
    }


# --- report ----------------------------------------------------------------------------------


def _iqr(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}, {s['q3']:.{digits}f}]"


def cpu_table(result: dict[str, Any], load: bool) -> str:
    rows = []
    for key, r in result.items():
        loop, variant = key.split("/", 1)
        none = variant == "none"
        row = [
            variant,
            loop,
            f"{r['cpu_pct']['median']:.3f}",
            "-" if none else _iqr(r["added_cpu_pct"], 3),
            "-" if none else f"{r['added_cpu_pct']['min']:.3f} .. {r['added_cpu_pct']['max']:.3f}",
            "-" if none else f"{r['watchdog_pct']['median']:.3f}",
        ]
        if load:
            row.insert(3, f"{r['units_per_second']['median']:.0f}")
            row.insert(6, "-" if none else _iqr(r["own_work_pct"], 3))
        rows.append(row)
    headers = [
        "variant",
        "loop",
        "process CPU, % of one core",
        "added process CPU vs none: median [IQR]",
        "added: min .. max",
        "its threads",
    ]
    if load:
        headers.insert(3, "work units/s")
        headers.insert(6, "asyncsentinel's own work: median [IQR]")
    return common.markdown_table(headers, rows)


def task_table(result: dict[str, Any]) -> str:
    return common.markdown_table(
        [
            "variant",
            "µs/task (median)",
            "added µs/task: median [IQR]",
            "added loop-thread CPU µs/task",
            "vs",
        ],
        [
            [
                v,
                f"{r['us_per_task']['median']:.2f}",
                "-" if r["baseline"] == v else _iqr(r["added_us_per_task"]),
                "-" if r["baseline"] == v else _iqr(r["added_cpu_us_per_task"]),
                r["baseline"],
            ]
            for v, r in result.items()
        ],
    )


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The suite's own options."""
    parser.add_argument(
        "--part",
        action="append",
        choices=("idle", "load", "tasks"),
        help="run only this part (repeatable; default all)",
    )
    parser.add_argument("--window", type=float, help="seconds per CPU window (10; quick 2)")
    parser.add_argument("--cpu-rounds", type=int, help="rounds of CPU windows (6; quick 3)")
    parser.add_argument("--task-rounds", type=int, help="rounds of the task part (30; quick 8)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suite, print the tables, write the JSON; returns the payload."""
    common.require_installed(PACKAGES)
    quick = bool(getattr(args, "quick", False))
    parts = args.part or ["idle", "load", "tasks"]
    window = args.window or (2.0 if quick else 10.0)
    cpu_rounds = args.cpu_rounds or (3 if quick else 6)
    task_rounds = args.task_rounds or (8 if quick else 30)
    batches, batch = 20, 100
    began = time.monotonic()
    payload: dict[str, Any] = {
        "suite": "loop_overhead",
        "description": DESCRIPTION,
        "machine": common.machine_info(),
        "versions": common.package_versions(PACKAGES),
        "asyncsentinel_sources_sha256": common.source_digests(SOURCE_FILES),
        "parameters": {
            "window_seconds": window,
            "cpu_rounds": cpu_rounds,
            "task_rounds": task_rounds,
            "tasks_per_batch": batch,
            "batches_per_variant_per_round": batches,
            "load": "20 coroutines, each every 5 ms: ~0.1 ms of pure-Python work",
            "target_idle_pct_of_one_core": TARGET_IDLE_PCT,
        },
    }
    sections = []
    if "idle" in parts:
        print(
            f"## idle: {cpu_rounds} rounds x {len(CPU_VARIANTS)} variants x {window} s", flush=True
        )
        idle = measure_cpu(cpu_rounds, window, load=False)
        payload["idle"] = idle
        verdicts = [
            f"{k}: {v['added_cpu_pct']['median']:.3f}% "
            f"({'meets' if v['added_cpu_pct']['median'] < TARGET_IDLE_PCT else 'MISSES'} the "
            f"<{TARGET_IDLE_PCT}% target)"
            for k, v in idle.items()
            if not k.endswith("/none")
        ]
        sections.append(
            "### Idle loop: CPU over each window\n\n"
            + cpu_table(idle, load=False)
            + "\n\nAdded CPU at idle, median: "
            + "; ".join(verdicts)
        )
    if "load" in parts:
        print(f"## under load: {cpu_rounds} rounds x {len(CPU_VARIANTS)} variants", flush=True)
        loaded = measure_cpu(cpu_rounds, window, load=True)
        payload["under_load"] = loaded
        sections.append("### Loop under a paced load\n\n" + cpu_table(loaded, load=True))
    if "tasks" in parts:
        n = batches * batch
        print(f"## per task: {task_rounds} rounds x {n} tasks per variant", flush=True)
        tasks = measure_tasks(task_rounds, batches, batch)
        payload["per_task"] = tasks
        sections.append("### Per task: create + await\n\n" + task_table(tasks))
    elapsed = time.monotonic() - began
    payload["run"] = {**common.run_info(), "elapsed_seconds": round(elapsed, 1)}
    text = "\n\n".join(sections)
    payload["tables_markdown"] = text
    print()
    print(text)
    print(f"\n{elapsed:.0f} s on a shared 2-core machine (load average {os.getloadavg()}).")
    results_dir = Path(getattr(args, "results_dir", None) or common.RESULTS_DIR)
    name = "loop_overhead.quick.json" if quick else "loop_overhead.json"
    if args.part:
        name = name.replace(".json", ".partial.json")
    path = common.write_json(results_dir / name, payload)
    print(f"results: {path}")
    return payload


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/loop_overhead.py [--quick] [options]``."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="short windows, few rounds (~80 s)")
    parser.add_argument("--results-dir", help="directory for the JSON (default benchmarks/results)")
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
