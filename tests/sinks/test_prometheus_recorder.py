"""Bound recorders (``Dispatcher.recorder``): the per-statement path records exactly what
``Dispatcher.record`` records, in-process and in prometheus_client's multiprocess mode."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from asyncsentinel import Sentinel
from asyncsentinel.instruments import (
    DB_CONNECTION_COUNT,
    DB_CONNECTION_TIMEOUTS,
    DB_DURATION_BUCKETS,
    DB_OPERATION_DURATION,
    FINDINGS,
    REQUEST_DB_QUERIES,
)
from asyncsentinel.sources.database_accounting import PoolStats
from tests.support import sample

LABELS = ("sqlite", "SELECT", "sqlite://")
DURATION = DB_OPERATION_DURATION.name

# Durations around every bucket bound (exactly on it, just below and above), beyond the last
# bound, zero and negative: the bucket search must agree with observe()'s scan everywhere.
_edges = [b * f for b in DB_DURATION_BUCKETS for f in (1.0, 1 - 1e-12, 1 + 1e-12)]
durations = st.lists(
    st.one_of(
        st.sampled_from([*_edges, 0.0, -1.0, 1e9]),
        st.floats(min_value=-1.0, max_value=30.0, allow_nan=False),
    ),
    min_size=1,  # binding creates the series (at 0) before any value; record() on the first
    max_size=300,  # several times the buffer of a bound histogram recorder
)


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for m in registry.collect()
        for s in m.samples
        if s.name.startswith(name) and not s.name.endswith("_created")
    }


def _recorded_both_ways(
    values: list[float],
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """The duration histogram's samples after *values* went through a bound recorder, and
    after they went through ``Dispatcher.record``."""
    bound_registry, plain_registry = CollectorRegistry(), CollectorRegistry()
    bound = Sentinel(registry=bound_registry, loop_monitor=False, sqlalchemy=False)
    plain = Sentinel(registry=plain_registry, loop_monitor=False, sqlalchemy=False)
    try:
        record = bound.dispatcher.recorder(DB_OPERATION_DURATION, LABELS)
        for value in values:
            record(value)
            plain.dispatcher.record(DB_OPERATION_DURATION, value, LABELS)
        return _samples(bound_registry, DURATION), _samples(plain_registry, DURATION)
    finally:
        bound.close()
        plain.close()


@settings(max_examples=60, deadline=None)
@given(values=durations)
@example(values=[0.0005 * (n % 7) for n in range(1, 300)])  # several buffer flushes
def test_histogram_recorder_matches_record(values: list[float]) -> None:
    bound_samples, plain_samples = _recorded_both_ways(values)
    total = (f"{DURATION}_sum", "")
    # Buffered observations are summed before being added: the same total up to rounding.
    assert math.isclose(bound_samples.pop(total), plain_samples.pop(total), abs_tol=1e-9)
    assert bound_samples == plain_samples  # every bucket and the count: exactly


def test_a_nan_duration_is_recorded_as_observe_records_it() -> None:
    """NaN is in no bucket: a buffered batch holding one still counts every bucket exactly."""
    values = [0.003 * (n % 11) for n in range(100)]
    values[40] = math.nan
    bound_samples, plain_samples = _recorded_both_ways(values)
    total = (f"{DURATION}_sum", "")
    assert math.isnan(bound_samples.pop(total)) and math.isnan(plain_samples.pop(total))
    assert bound_samples == plain_samples
    # prometheus_client's count is its +Inf bucket, where NaN is not: 99 of 100.
    assert bound_samples[(f"{DURATION}_count", "")] == 99


def test_every_scrape_sees_every_observation(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry
) -> None:
    observe = make_sentinel(loop_monitor=False).dispatcher.recorder(DB_OPERATION_DURATION, LABELS)
    labels = dict(zip(DB_OPERATION_DURATION.labels, LABELS, strict=True))
    for n in range(1, 200):
        observe(0.002)
        assert sample(registry, f"{DURATION}_count", **labels) == n


def test_observations_from_many_threads_are_all_counted(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry
) -> None:
    observe = make_sentinel(loop_monitor=False).dispatcher.recorder(DB_OPERATION_DURATION, LABELS)
    labels = dict(zip(DB_OPERATION_DURATION.labels, LABELS, strict=True))
    per_thread, threads = 20_000, 4
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            observe(0.0001)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    scraped = []
    while any(w.is_alive() for w in workers):  # scrapes racing the observations
        scraped.append(sample(registry, f"{DURATION}_count", **labels))
    for worker in workers:
        worker.join()
    assert scraped == sorted(scraped)  # never goes backwards
    assert sample(registry, f"{DURATION}_count", **labels) == per_thread * threads
    assert sample(registry, f"{DURATION}_bucket", le="0.0005", **labels) == per_thread * threads


def test_gauge_and_counter_recorders_record_deltas(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry
) -> None:
    dispatcher = make_sentinel(loop_monitor=False).dispatcher
    used = dispatcher.recorder(DB_CONNECTION_COUNT, ("pool", "used"))
    timeouts = dispatcher.recorder(DB_CONNECTION_TIMEOUTS, ("pool",))
    for delta in (1, 1, -1, 1, -1, -1):
        used(delta)
    used(3)
    timeouts(1)
    timeouts(1)
    assert sample(registry, "db_client_connection_count", **_pool_labels("used")) == 3
    assert sample(registry, "db_client_connection_timeouts_total", **_pool_labels()) == 2


def _pool_labels(state: str | None = None) -> dict[str, str]:
    labels = {"db_client_connection_pool_name": "pool"}
    if state is not None:
        labels["db_client_connection_state"] = state
    return labels


def _levels(registry: CollectorRegistry, pool: str) -> tuple[float | None, ...]:
    labels = {"db_client_connection_pool_name": pool}
    return (
        sample(registry, "db_client_connection_count", db_client_connection_state="used", **labels),
        sample(registry, "db_client_connection_count", db_client_connection_state="idle", **labels),
        sample(registry, "db_client_connection_pending_requests", **labels),
    )


def test_pool_levels_are_read_when_scraped_and_follow_renames_and_pools(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry
) -> None:
    """In-process, a pool's used/idle/pending levels are counters read at every scrape (no
    gauge update per checkout); pools of one name add up; a renamed pool takes its levels
    along; a pool that is gone no longer counts."""
    dispatcher = make_sentinel(loop_monitor=False, sqlalchemy=False).dispatcher
    first = PoolStats(dispatcher, "pool", 5)
    first.wait_started()
    first.checked_out(from_idle=False, wait_seconds=0.001)
    first.checked_in(use_seconds=0.01, to_idle=True)
    first.wait_ended()
    first.wait_started()  # a caller still waiting
    first.checked_out(from_idle=True, wait_seconds=0.001)
    assert _levels(registry, "pool") == (1, 0, 1)
    second = PoolStats(dispatcher, "pool", 5)
    second.checked_out(from_idle=False, wait_seconds=0.001)
    assert _levels(registry, "pool") == (2, 0, 1)
    second.rename("other")
    assert _levels(registry, "pool") == (1, 0, 1)
    assert _levels(registry, "other") == (1, 0, 0)
    del second
    gc.collect()
    assert _levels(registry, "other") == (0, 0, 0)
    first.set_levels(used=3, idle=2)
    assert _levels(registry, "pool") == (3, 2, 1)


def test_recorder_errors_are_contained_and_counted(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry
) -> None:
    dispatcher = make_sentinel(loop_monitor=False).dispatcher
    timeouts = dispatcher.recorder(DB_CONNECTION_TIMEOUTS, ("pool",))
    timeouts(-1)  # prometheus_client refuses to decrement a counter: a real sink error
    assert (
        sample(
            registry, "asyncsentinel_instrumentation_errors_total", component="sink.PrometheusSink"
        )
        == 1
    )
    assert sample(registry, "db_client_connection_timeouts_total", **_pool_labels()) == 0


_MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from prometheus_client import CollectorRegistry, multiprocess
    from asyncsentinel import Sentinel
    from asyncsentinel.instruments import DB_CONNECTION_COUNT, DB_OPERATION_DURATION
    from asyncsentinel.sources.database_accounting import PoolStats

    sentinel = Sentinel(registry=CollectorRegistry(), loop_monitor=False, sqlalchemy=False)
    # Pool levels: recorded as changes here (the collecting process reads files).
    stats = PoolStats(sentinel.dispatcher, "pool", 5)
    stats.wait_started(); stats.wait_ended()
    stats.checked_out(from_idle=False, wait_seconds=0.001)
    stats.checked_in(use_seconds=0.01, to_idle=True)
    stats.wait_started()
    stats.checked_out(from_idle=True, wait_seconds=0.001)
    # Requests in flight: also recorded as changes (one GET ended, one still running).
    scope = {"type": "http", "method": "GET", "path": "/", "root_path": ""}
    sentinel.end_request(sentinel.begin_request(scope), None)
    sentinel.begin_request(scope)
    observe = sentinel.dispatcher.recorder(DB_OPERATION_DURATION, ("sqlite", "SELECT", "db"))
    used = sentinel.dispatcher.recorder(DB_CONNECTION_COUNT, ("db", "used"))
    for value in (0.0002, 0.003, 0.003, 7.0):
        observe(value)
    used(1); used(1); used(-1)
    sentinel.close()
    scrape = CollectorRegistry()
    multiprocess.MultiProcessCollector(scrape)
    out = {}
    for metric in scrape.collect():
        for s in metric.samples:
            key = s.name + "|" + s.labels.get("le", "") + "|" + s.labels.get(
                "db_client_connection_state", "") + "|" + s.labels.get(
                "db_client_connection_pool_name", "")
            out[key] = s.value
    json.dump(out, sys.stdout)
    """
)


def test_recorders_write_multiprocess_files(tmp_path: Path) -> None:
    # prometheus_client picks its value class at import: multiprocess mode needs its own process.
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", _MULTIPROCESS_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(done.stdout)
    assert seen[f"{DURATION}_count|||db"] == 4
    assert abs(seen[f"{DURATION}_sum|||db"] - 7.0062) < 1e-9
    assert seen[f"{DURATION}_bucket|0.0005||db"] == 1
    assert seen[f"{DURATION}_bucket|0.005||db"] == 3
    assert seen[f"{DURATION}_bucket|5.0||db"] == 3
    assert seen[f"{DURATION}_bucket|10.0||db"] == 4
    assert seen["db_client_connection_count||used|db"] == 1
    assert seen["db_client_connection_count||used|pool"] == 1
    assert seen["db_client_connection_count||idle|pool"] == 0
    assert seen["db_client_connection_pending_requests|||pool"] == 1
    assert seen["http_server_active_requests|||"] == 1


def test_recording_from_a_gc_finalizer_while_creating_a_series_does_not_deadlock(
    make_sentinel: Callable[..., Sentinel], registry: CollectorRegistry
) -> None:
    """SQLAlchemy finalizes a connection nobody closed from the garbage collector and
    asyncsentinel records that; the collection runs inside whatever allocated, such as the
    sink creating a series of another metric under its lock."""
    dispatcher = make_sentinel(loop_monitor=False).dispatcher
    finalized: list[int] = []

    class Garbage:
        def __init__(self, number: int) -> None:
            self.number = number
            self.cycle = self  # only the cyclic collector frees it

        def __del__(self) -> None:  # a new series each time: the sink's lock is taken
            finalized.append(self.number)
            dispatcher.record(REQUEST_DB_QUERIES, 3, (f"/finalized/{self.number}",))

    def record_new_series() -> None:
        threshold = gc.get_threshold()
        try:
            for n in range(1, 60):
                gc.collect()
                gc.disable()
                Garbage(n)
                # The collection runs at the n-th allocation from here: one of them is inside
                # the creation of the series below, under the sink's lock.
                gc.set_threshold(gc.get_count()[0] + n)
                gc.enable()
                dispatcher.record(FINDINGS, 1, ("n_plus_one", f"/new-series/{n}"))
                gc.disable()
                gc.set_threshold(*threshold)
        finally:
            gc.set_threshold(*threshold)
            gc.enable()

    worker = threading.Thread(target=record_new_series, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "deadlocked"
    gc.collect()
    assert sorted(finalized) == list(range(1, 60))
    findings = "asyncsentinel_findings_total"
    queries = "asyncsentinel_request_db_queries_sum"
    for n in range(1, 60):
        assert sample(registry, findings, kind="n_plus_one", http_route=f"/new-series/{n}") == 1
        assert sample(registry, queries, http_route=f"/finalized/{n}") == 3
