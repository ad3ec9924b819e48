"""Where asyncsentinel's per-request time goes: a component breakdown and a profile.

``python benchmarks/profile_request.py`` prints

1. a **breakdown**: each piece of the request path timed on its own in a tight loop
   (prometheus_client primitives, the sink, the dispatcher, ``begin_request``/``end_request``,
   the middleware around a minimal ASGI app), in microseconds per call, median of repeats;
2. a **cProfile** of the in-process FastAPI loop with asyncsentinel, restricted to asyncsentinel's
   and prometheus_client's functions, as microseconds per request (the profiler inflates small
   functions: use it to rank, the breakdown to size);
3. with ``--pyinstrument``, a pyinstrument call tree of the same loop.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

import common
import variants
from request_overhead import YIELD_EVERY, _http_scope, _receive, _Responses, drive

REPEATS = 9


async def _timed_ns(fn: Callable[[], object], calls: int) -> int:
    """Nanoseconds *calls* calls of *fn* take, returning to the event loop every few calls.

    Without the returns the loop would look blocked to asyncsentinel's loop monitor, whose
    watchdog would then sample stacks and take the GIL: an artefact no server has.
    """
    elapsed = 0
    done = 0
    while done < calls:
        chunk = min(YIELD_EVERY, calls - done)
        start = time.perf_counter_ns()
        for _ in range(chunk):
            fn()
        elapsed += time.perf_counter_ns() - start
        done += chunk
        await asyncio.sleep(0)
    return elapsed


async def _interleaved_per_call_us(
    rows: list[tuple[str, Callable[[], object]]], calls: int
) -> list[tuple[str, float]]:
    """Median µs per call of each row; repeats interleave the rows so load bursts hit all."""
    samples: dict[str, list[float]] = {label: [] for label, _ in rows}
    for _ in range(REPEATS):
        for label, fn in rows:
            samples[label].append(await _timed_ns(fn, calls) / calls / 1000)
    return [(label, statistics.median(samples[label])) for label, _ in rows]


async def _per_request_async_us(make_call: Callable[[], Any], calls: int) -> float:
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        for i in range(calls):
            await make_call()
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        samples.append((time.perf_counter_ns() - start) / calls / 1000)
    return statistics.median(samples)


async def _minimal_app(scope: Any, receive: Any, send: Any) -> None:
    """The least an ASGI app can do: a fixed JSON response, with a route in the scope."""
    scope["route"] = _ROUTE
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": variants.EXPECTED_BODY})


class _Route:
    path = variants.ROUTE_TEMPLATE


_ROUTE = _Route()


async def _noop_send(message: Any) -> None:
    pass


async def breakdown(calls: int) -> list[tuple[str, float]]:
    """Each component of the request path timed on its own, on a running event loop.

    Runs with the default settings, so the request hooks of every source enabled by default
    are part of ``begin_request``/``end_request``.
    """
    from asyncsentinel import Sentinel, SentinelMiddleware
    from asyncsentinel.context import enter_request, exit_request
    from asyncsentinel.instruments import (
        HTTP_SERVER_ACTIVE_REQUESTS,
        HTTP_SERVER_REQUEST_DURATION,
    )

    sentinel = Sentinel(registry=CollectorRegistry())
    core = Sentinel(registry=CollectorRegistry(), **variants.NO_SOURCES)
    # One sentinel per source switch, that source alone on: what each detector adds per request.
    only_one = {
        setting: Sentinel(registry=CollectorRegistry(), **{**variants.NO_SOURCES, setting: True})
        for setting in variants.NO_SOURCES
    }
    for one in only_one.values():
        await one.startup()
    sink = sentinel.prometheus
    dispatcher = sentinel.dispatcher
    duration_labels = ("GET", variants.ROUTE_TEMPLATE, "200")
    histogram_child = sink._child(HTTP_SERVER_REQUEST_DURATION, duration_labels)
    gauge_child = sink._child(HTTP_SERVER_ACTIVE_REQUESTS, ("GET",))
    scope = _http_scope()
    scope["route"] = _ROUTE

    def begin_end_of(target: Any) -> Callable[[], None]:
        def begin_end() -> None:
            state = target.begin_request(dict(scope))
            assert state is not None
            target.end_request(state, None)

        return begin_end

    def context_enter_exit() -> None:
        exit_request(enter_request(None))

    rows = [
        ("prometheus_client Histogram child .observe()", lambda: histogram_child.observe(0.001)),
        ("prometheus_client Gauge child .inc()", lambda: gauge_child.inc(1)),
        (
            "PrometheusSink.record(histogram)",
            lambda: sink.record(HTTP_SERVER_REQUEST_DURATION, 0.001, duration_labels),
        ),
        (
            "Dispatcher.record(histogram)",
            lambda: dispatcher.record(HTTP_SERVER_REQUEST_DURATION, 0.001, duration_labels),
        ),
        (
            "Dispatcher.record(gauge)",
            lambda: dispatcher.record(HTTP_SERVER_ACTIVE_REQUESTS, 1, ("GET",)),
        ),
        ("enter_request + exit_request (contextvar)", context_enter_exit),
        ("Sentinel.begin_request + end_request, sources off", begin_end_of(core)),
        *[
            (f"  ... with only {setting}=True", begin_end_of(one))
            for setting, one in only_one.items()
        ],
        ("Sentinel.begin_request + end_request, default settings", begin_end_of(sentinel)),
    ]
    results = await _interleaved_per_call_us(rows, calls)

    middleware = SentinelMiddleware(_minimal_app, sentinel=sentinel)
    await sentinel.startup()  # what the lifespan does: start the sources' background work

    def bare_call() -> Any:
        return _minimal_app(dict(scope), _receive, _noop_send)

    def wrapped_call() -> Any:
        return middleware(dict(scope), _receive, _noop_send)

    bare_us = await _per_request_async_us(bare_call, calls)
    wrapped_us = await _per_request_async_us(wrapped_call, calls)
    results.append(("minimal ASGI app, bare", bare_us))
    results.append(("minimal ASGI app + SentinelMiddleware", wrapped_us))
    results.append(("  => SentinelMiddleware total", wrapped_us - bare_us))
    await sentinel.shutdown()
    sentinel.close()
    core.close()
    for one in only_one.values():
        await one.shutdown()
        one.close()
    errors = sum(
        s.value
        for m in sentinel.registry.collect()
        for s in m.samples
        if s.name == "asyncsentinel_instrumentation_errors_total"
    )
    if errors:
        raise RuntimeError(f"asyncsentinel counted {errors:g} internal errors in the breakdown")
    return results


def _profiled_loop(requests: int) -> tuple[variants.Variant, Callable[[], Any]]:
    variant = variants.build(variants.ASYNCSENTINEL)

    async def loop() -> None:
        await drive(variant.app, 200, _Responses())  # warm up outside the profile
        await drive(variant.app, requests, _Responses())

    return variant, loop


def profile(requests: int, top: int) -> str:
    """cProfile of the in-process loop, asyncsentinel and prometheus_client functions only."""
    variant, loop = _profiled_loop(requests)
    profiler = cProfile.Profile()
    try:
        profiler.enable()
        asyncio.run(loop())
        profiler.disable()
    finally:
        variant.close()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, function), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "asyncsentinel" not in filename and "prometheus_client" not in filename:
            continue
        short = filename.split("site-packages/")[-1].split("/src/")[-1]
        rows.append(
            (
                tottime,
                [
                    f"{short}:{line} {function}",
                    f"{calls / requests:.2f}",
                    f"{tottime / requests * 1e6:.2f}",
                    f"{cumtime / requests * 1e6:.2f}",
                ],
            )
        )
    rows.sort(key=lambda r: r[0], reverse=True)
    return common.markdown_table(
        ["function", "calls/request", "own µs/request", "cumulative µs/request"],
        [r for _, r in rows[:top]],
    )


def pyinstrument_tree(requests: int) -> str:
    """A pyinstrument call tree of the in-process loop (needs ``pip install pyinstrument``)."""
    from pyinstrument import Profiler

    variant, loop = _profiled_loop(requests)
    profiler = Profiler(interval=0.0001, async_mode="disabled")
    try:
        profiler.start()
        asyncio.run(loop())
        profiler.stop()
    finally:
        variant.close()
    return str(profiler.output_text(unicode=True, color=False, show_all=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per breakdown repeat")
    parser.add_argument("--requests", type=int, default=20_000, help="requests to profile")
    parser.add_argument("--top", type=int, default=25, help="rows of the profile table")
    parser.add_argument("--pyinstrument", action="store_true", help="also print a call tree")
    args = parser.parse_args(argv)
    print("## Breakdown (µs per call, median of repeats)\n")
    rows = asyncio.run(breakdown(args.calls))
    print(common.markdown_table(["component", "µs/call"], [[k, f"{us:.2f}"] for k, us in rows]))
    print(f"\n## cProfile, {args.requests} in-process requests with asyncsentinel\n")
    print(profile(args.requests, args.top))
    if args.pyinstrument:
        print("\n## pyinstrument\n")
        print(pyinstrument_tree(args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
