"""Per-request overhead of asyncsentinel next to its peers, on a trivial FastAPI JSON route.

Two modes, each measuring every variant (see ``variants.py``) side by side in one run:

* **in-process** — each request is ``await app(scope, receive, send)`` with a prebuilt scope and
  no-op ``receive``/``send``: no HTTP parsing, no sockets, no client; what remains is the
  framework plus the instrumentation. All variants live in this process on one event loop.
* **loopback** — each variant runs under uvicorn in its own process; a keep-alive client in this
  process drives it over 127.0.0.1 (see ``loopback.py``).

Per round, every variant serves one batch of requests, in an order rotated from round to round.
For each round the variant's microseconds per request minus bare's in the *same round* is one
paired difference; the figure reported is the median of those differences across rounds, with
the interquartile range as its spread. Throughput ratio = bare's time / the variant's time, per
round, median across rounds.

In-process, a variant's lifespan runs around each of its batches (startup before, shutdown
after, both untimed), so background work started at startup (e.g. a loop monitor's heartbeat)
costs time only inside that variant's own batches.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import variants

DESCRIPTION = __doc__.splitlines()[0]

TARGET_RATIO = 0.5
"""asyncsentinel may add at most this fraction of what prometheus-fastapi-instrumentator adds."""

PACKAGES = (
    "asyncsentinel",
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "httptools",
    "uvloop",
    "prometheus-client",
    "prometheus-fastapi-instrumentator",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-asgi",
    "opentelemetry-instrumentation-fastapi",
)


@dataclass(frozen=True)
class Plan:
    """How much to measure."""

    rounds: int
    requests: int
    warmup: int


FULL = {"in-process": Plan(30, 2000, 100), "loopback": Plan(20, 2000, 200)}
QUICK = {"in-process": Plan(8, 500, 50), "loopback": Plan(5, 500, 100)}


# --- in-process -----------------------------------------------------------------------------------
def _http_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": variants.REQUEST_PATH,
        "raw_path": variants.REQUEST_PATH.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"asyncsentinel-benchmark"),
            (b"accept", b"application/json"),
        ],
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


class _Responses:
    """The ``send`` callable: counts OK responses, keeps nothing else."""

    def __init__(self) -> None:
        self.ok = 0
        self.not_ok = 0
        self.last_body = b""

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if message["status"] == 200:
                self.ok += 1
            else:
                self.not_ok += 1
        elif message["type"] == "http.response.body":
            self.last_body = message.get("body", b"")


YIELD_EVERY = 8
"""Requests served between two returns to the event loop (a server returns after each one)."""


async def drive(app: Any, requests: int, responses: _Responses) -> int:
    """Serve *requests* requests through the ASGI interface; returns elapsed nanoseconds.

    Awaiting the app never suspends here, so without the periodic ``sleep(0)`` a batch would
    hold the event loop for its whole duration: a blocked loop, which asyncsentinel's loop
    monitor rightly reports (and samples stacks for) — an artefact no server has.
    """
    template = _http_scope()
    receive, send = _receive, responses.send
    start = time.perf_counter_ns()
    for i in range(requests):
        scope = template.copy()  # the app adds keys (route, endpoint, path_params...) to it
        scope["state"] = {}
        await app(scope, receive, send)
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    return time.perf_counter_ns() - start


class Lifespan:
    """Runs an ASGI app's lifespan protocol the way a server does."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._task: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"lifespan startup failed: {message}")

    async def shutdown(self) -> None:
        await self._to_app.put({"type": "lifespan.shutdown"})
        message = await self._from_app.get()
        if message["type"] != "lifespan.shutdown.complete":
            raise RuntimeError(f"lifespan shutdown failed: {message}")
        assert self._task is not None
        await self._task


class _Measurements:
    """Per-round microseconds per request of each variant: wall-clock and CPU time."""

    def __init__(self, names: Sequence[str]) -> None:
        self.wall: dict[str, list[float]] = {name: [] for name in names}
        self.cpu: dict[str, list[float]] = {name: [] for name in names}

    def add(self, name: str, requests: int, wall_ns: int, cpu_ns: int | None) -> None:
        self.wall[name].append(wall_ns / requests / 1000)
        if cpu_ns is not None:
            self.cpu[name].append(cpu_ns / requests / 1000)


async def _in_process(names: Sequence[str], plan: Plan) -> _Measurements:
    built = {name: variants.build(name) for name in names}
    try:
        # First contact: check each app answers correctly, and warm caches (routing, pydantic).
        for variant in built.values():
            responses = _Responses()
            lifespan = Lifespan(variant.app)
            await lifespan.startup()
            await drive(variant.app, max(plan.warmup, 50), responses)
            await lifespan.shutdown()
            variant.after_batch()
            if responses.not_ok or responses.last_body != variants.EXPECTED_BODY:
                raise RuntimeError(f"{variant.name} answered {responses.last_body!r}")
        measured = _Measurements(names)
        for round_index in range(plan.rounds):
            for name in common.rotated(names, round_index):
                variant = built[name]
                responses = _Responses()
                lifespan = Lifespan(variant.app)
                await lifespan.startup()
                await drive(variant.app, plan.warmup, responses)
                gc.collect()  # start every batch with the same garbage-collector state
                cpu_start = time.process_time_ns()  # all threads: SDK exporters, watchdogs
                elapsed = await drive(variant.app, plan.requests, responses)
                cpu = time.process_time_ns() - cpu_start
                await lifespan.shutdown()
                variant.after_batch()
                if responses.not_ok:
                    raise RuntimeError(f"{name}: {responses.not_ok} responses were not 200")
                measured.add(name, plan.requests, elapsed, cpu)
            _progress(f"in-process round {round_index + 1}/{plan.rounds}")
        _check_instrumentation(built.values(), plan)
        return measured
    finally:
        for variant in built.values():
            variant.close()


def _check_instrumentation(built: Any, plan: Plan) -> None:
    for variant in built:
        errors = variant.errors()
        if errors:
            raise RuntimeError(f"{variant.name}: {errors:g} internal errors during the benchmark")
        findings = variant.findings()
        if findings:
            # The app is healthy: a finding is a false positive (and its cost would be in the
            # figures), so the run fails and says which.
            raise RuntimeError(f"{variant.name} reported findings on a healthy app: {findings}")
        recorded = variant.recorded()
        if recorded == recorded and recorded < plan.rounds * plan.requests:  # nan: not counted
            raise RuntimeError(f"{variant.name} recorded only {recorded:g} requests")


def run_in_process(names: Sequence[str], plan: Plan, loop: str) -> _Measurements:
    """Per-round microseconds per request of each variant, served in-process."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(_in_process(names, plan))
    return asyncio.run(_in_process(names, plan))


# --- loopback -------------------------------------------------------------------------------------
async def _loopback_rounds(servers: dict[str, Any], plan: Plan, concurrency: int) -> _Measurements:
    from loopback import KeepAliveClient

    clients = {
        name: await KeepAliveClient.connect(server.port, concurrency)
        for name, server in servers.items()
    }
    try:
        for client in clients.values():
            await client.run(plan.warmup)
        names = list(servers)
        measured = _Measurements(names)
        for round_index in range(plan.rounds):
            for name in common.rotated(names, round_index):
                server = servers[name]
                cpu_start = server.cpu_ns()
                elapsed = await clients[name].run(plan.requests)
                cpu_end = server.cpu_ns()
                cpu = None if cpu_start is None or cpu_end is None else cpu_end - cpu_start
                measured.add(name, plan.requests, elapsed, cpu)
            _progress(f"loopback round {round_index + 1}/{plan.rounds}")
        return measured
    finally:
        for client in clients.values():
            client.close()


def run_loopback(
    names: Sequence[str], plan: Plan, server_loop: str, concurrency: int
) -> _Measurements:
    """Per-round microseconds per request of each variant under uvicorn over 127.0.0.1."""
    from loopback import ServerProcess

    servers: dict[str, ServerProcess] = {}
    try:
        for name in names:
            servers[name] = ServerProcess(name, server_loop)
        try:
            import uvloop

            result = uvloop.run(_loopback_rounds(servers, plan, concurrency))
        except ImportError:
            result = asyncio.run(_loopback_rounds(servers, plan, concurrency))
    finally:
        counts = {name: server.stop() for name, server in servers.items()}
    expected = plan.warmup + plan.rounds * plan.requests
    for name, count in counts.items():
        if count.get("errors"):
            raise RuntimeError(f"{name}: {count['errors']:g} internal errors during the benchmark")
        if count.get("findings"):
            raise RuntimeError(f"{name} reported findings on a healthy app: {count['findings']}")
        recorded = count.get("recorded", float("nan"))
        if recorded == recorded and recorded < expected:
            raise RuntimeError(f"{name} recorded only {recorded:g} of {expected} requests")
    return result


# --- analysis and report --------------------------------------------------------------------------
def _paired(values: dict[str, list[float]], *, ratios: bool) -> dict[str, Any]:
    bare = values[variants.BARE]
    out: dict[str, Any] = {}
    for name, series in values.items():
        entry: dict[str, Any] = {
            "us_per_request": _rounded(common.summarize(series)),
            "per_round_us": [round(v, 3) for v in series],
        }
        if name != variants.BARE:
            added = [v - b for v, b in zip(series, bare, strict=True)]
            entry["added_us"] = _rounded(common.summarize(added))
            if ratios:
                ratio = [b / v for v, b in zip(series, bare, strict=True)]
                entry["throughput_ratio"] = _rounded(common.summarize(ratio), 4)
        out[name] = entry
    return out


def analyse(measured: _Measurements) -> dict[str, Any]:
    """Paired per-round statistics of every variant against bare, wall-clock and CPU time."""
    wall = _paired(measured.wall, ratios=True)
    has_cpu = all(len(v) == len(measured.wall[k]) for k, v in measured.cpu.items())
    cpu = _paired(measured.cpu, ratios=False) if has_cpu else {}
    out: dict[str, Any] = {}
    for name, entry in wall.items():
        out[name] = {
            "requests_per_second": round(1e6 / entry["us_per_request"]["median"], 1),
            "wall": entry,
        }
        if name in cpu:
            out[name]["cpu"] = cpu[name]
    return out


def _rounded(stats: dict[str, float], digits: int = 2) -> dict[str, float]:
    return {k: round(v, digits) for k, v in stats.items()}


def target_verdict(analysis: dict[str, Any]) -> dict[str, Any] | None:
    """Whether asyncsentinel adds at most half of what prometheus-fastapi-instrumentator adds."""
    if variants.ASYNCSENTINEL not in analysis or variants.INSTRUMENTATOR not in analysis:
        return None
    verdict: dict[str, Any] = {}
    for clock in ("wall", "cpu"):
        if clock not in analysis[variants.ASYNCSENTINEL]:
            continue
        ours = analysis[variants.ASYNCSENTINEL][clock]["added_us"]["median"]
        theirs = analysis[variants.INSTRUMENTATOR][clock]["added_us"]["median"]
        verdict[clock] = {
            "asyncsentinel_added_us": ours,
            "instrumentator_added_us": theirs,
            "limit_us": round(TARGET_RATIO * theirs, 2),
            "fraction_of_instrumentator": round(ours / theirs, 3) if theirs > 0 else None,
            "met": ours <= TARGET_RATIO * theirs,
        }
    return verdict


def _median_iqr(stats: dict[str, float]) -> str:
    return f"{stats['median']:+.1f} [{stats['q1']:+.1f}, {stats['q3']:+.1f}]"


def report_table(analysis: dict[str, Any]) -> str:
    """The Markdown table printed after a mode finishes."""
    rows = []
    for name, entry in analysis.items():
        wall, cpu = entry["wall"], entry.get("cpu")
        if name == variants.BARE:
            added, added_cpu, ratio = "—", "—", "1.000"
        else:
            added = _median_iqr(wall["added_us"])
            added_cpu = _median_iqr(cpu["added_us"]) if cpu else "n/a"
            ratio = f"{wall['throughput_ratio']['median']:.3f}"
        rows.append(
            [
                name,
                f"{wall['us_per_request']['median']:.1f}",
                added,
                ratio,
                f"{cpu['us_per_request']['median']:.1f}" if cpu else "n/a",
                added_cpu,
            ]
        )
    return common.markdown_table(
        [
            "variant",
            "µs/request",
            "added µs/request: median [IQR]",
            "throughput vs bare",
            "CPU µs/request",
            "added CPU µs: median [IQR]",
        ],
        rows,
    )


def verdict_text(verdict: dict[str, Any]) -> str:
    """One line per clock saying whether the target is met."""
    lines = []
    for clock, v in verdict.items():
        label = "wall-clock" if clock == "wall" else "CPU time"
        lines.append(
            f"{label}: asyncsentinel adds {v['asyncsentinel_added_us']:.1f} µs/request = "
            f"{v['fraction_of_instrumentator']:.2f} x prometheus-fastapi-instrumentator's "
            f"{v['instrumentator_added_us']:.1f} µs (target ≤ {TARGET_RATIO}: "
            f"{'met' if v['met'] else 'MISSED'})"
        )
    return "\n".join(lines)


def _resolved_loop(loop: str) -> str:
    """uvicorn's ``auto`` picks uvloop when it is installed."""
    if loop != "auto":
        return loop
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "auto (asyncio)"
    return "auto (uvloop)"


def _progress(text: str) -> None:
    print(f"  … {text}", file=sys.stderr, flush=True)


# --- entry point ----------------------------------------------------------------------------------
def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, rounds: bool = True
) -> None:
    """Options of this suite (``run.py`` passes an argument group and has its own --rounds)."""
    parser.add_argument(
        "--mode",
        action="append",
        choices=("in-process", "loopback"),
        help="measure only this mode (repeatable; default: both)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(variants.DEFAULT_VARIANTS),
        help=(
            f"comma-separated, bare first (available: {', '.join(variants.ALL_VARIANTS)}; "
            "and asyncsentinel/<setting>=<value>/... for asyncsentinel with other settings)"
        ),
    )
    if rounds:
        parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--requests", type=int, help="override the requests per batch")
    parser.add_argument(
        "--loop",
        default="asyncio",
        choices=("asyncio", "uvloop"),
        help="event loop of the in-process mode (default asyncio)",
    )
    parser.add_argument(
        "--server-loop",
        default="auto",
        choices=("auto", "asyncio", "uvloop"),
        help="uvicorn's --loop in loopback mode (default auto: uvloop when installed)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="keep-alive connections per server (loopback)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suite as configured by *args*; print tables; write and return the results."""
    common.require_installed(PACKAGES)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if not names or names[0] != variants.BARE:
        names = [variants.BARE, *[n for n in names if n != variants.BARE]]
    for name in names:
        if not variants.is_known(name):
            raise SystemExit(f"unknown variant {name!r}; choose from {variants.ALL_VARIANTS}")
    plans = QUICK if args.quick else FULL
    modes = args.mode or ["in-process", "loopback"]
    results: dict[str, Any] = {
        "suite": "request_overhead",
        "description": DESCRIPTION,
        "route": f"GET {variants.REQUEST_PATH} (template {variants.ROUTE_TEMPLATE}), JSON body",
        "quick": bool(args.quick),
        "machine": common.machine_info(),
        "run": common.run_info(),
        "versions": common.package_versions(PACKAGES),
        "asyncsentinel_default_settings": variants.asyncsentinel_details(),
        "target": (
            "asyncsentinel's added µs/request (in-process) <= "
            f"{TARGET_RATIO} x prometheus-fastapi-instrumentator's"
        ),
        "modes": {},
    }
    for mode in modes:
        base = plans[mode]
        plan = Plan(args.rounds or base.rounds, args.requests or base.requests, base.warmup)
        print(
            f"\n## {mode}: {plan.rounds} rounds x {plan.requests} requests per variant",
            flush=True,
        )
        started = time.monotonic()
        if mode == "in-process":
            raw = run_in_process(names, plan, args.loop)
            setup: dict[str, Any] = {"event_loop": args.loop}
        else:
            from loopback import http_implementation

            raw = run_loopback(names, plan, args.server_loop, args.concurrency)
            setup = {
                "server": "uvicorn, one process per variant, access log off",
                "server_loop": _resolved_loop(args.server_loop),
                "server_http": http_implementation(),
                "client": "asyncio keep-alive client in the benchmark process (closed loop)",
                "concurrency": args.concurrency,
            }
        analysis = analyse(raw)
        verdict = target_verdict(analysis)
        results["modes"][mode] = {
            "rounds": plan.rounds,
            "requests_per_round": plan.requests,
            "setup": setup,
            "variant_order": names,  # the JSON's keys are sorted; tables follow this order
            "duration_seconds": round(time.monotonic() - started, 1),
            "variants": analysis,
            "target": verdict,
        }
        print(report_table(analysis), flush=True)
        if verdict:
            print("\n" + verdict_text(verdict), flush=True)
    load = common.machine_info()["load_average_at_start"]
    results["machine"]["load_average_at_end"] = load
    default_name = "request_overhead.quick.json" if args.quick else "request_overhead.json"
    output = Path(getattr(args, "results_dir", None) or common.RESULTS_DIR) / default_name
    common.write_json(output, results)
    print(f"\nresults written to {output}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    parser.add_argument("--results-dir", help="JSON output directory (default benchmarks/results)")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
