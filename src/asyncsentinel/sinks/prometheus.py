"""Prometheus sink: turns the instrument catalogue into prometheus_client metric families.

One set of metric families exists per ``CollectorRegistry`` (several :class:`Sentinel` objects on
one registry share it, as metrics of one process must). Each family holds at most
``max_label_sets`` label combinations; past that, new combinations are folded into one series
whose label values are all ``__overflow__``, so no input can grow the scrape without bound.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from asyncsentinel.instruments import ALL_INSTRUMENTS, Instrument

OVERFLOW_LABEL = "__overflow__"

_families_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)
_families_lock = threading.Lock()


def _histogram_cells(
    child: Any,
) -> tuple[list[float], Callable[[float], None], list[Callable[[float], None]]] | None:
    """A histogram child's bucket bounds, sum cell and bucket cells (their ``inc``), or
    ``None`` if prometheus_client lays them out differently than 0.20 to 0.26 do."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if (
        total is None
        or not isinstance(bounds, list)
        or not isinstance(buckets, list)
        or len(bounds) != len(buckets)
        or not bounds
        or bounds[-1] != math.inf
        or not all(hasattr(b, "inc") for b in buckets)
        or not hasattr(total, "inc")
    ):
        return None
    return bounds, total.inc, [b.inc for b in buckets]


_FLUSH_AT = 64
"""Observations a bound histogram recorder buffers before folding them into its series."""


class _PendingObservations:
    """Observations of one histogram series that a bound recorder buffered (in-process mode).

    Appending to a list is one call and atomic under the GIL, where ``observe()`` takes two
    locks; the buffer is folded into the series every :data:`_FLUSH_AT` observations and
    whenever the family is collected (:class:`_Histogram`), so every scrape is exact.
    """

    __slots__ = ("_cells", "_lock", "_observe", "values")

    def __init__(
        self,
        cells: tuple[list[float], Callable[[float], None], list[Callable[[float], None]]],
        observe: Callable[[float], None],
    ) -> None:
        self.values: list[float] = []
        self._cells = cells
        self._observe = observe
        self._lock = threading.Lock()

    def flush(self) -> None:
        """Fold the buffered observations into the series (waits for a flush under way)."""
        with self._lock:  # held while folding: a scrape waiting here then sees them all
            self._fold()

    def try_flush(self) -> None:
        """:meth:`flush`, unless one is under way: in another thread, or in this one when a
        garbage-collector finalizer (SQLAlchemy's, for a connection nobody closed) records
        while a flush allocates. The observations then stay buffered for the next flush."""
        if self._lock.acquire(blocking=False):
            try:
                self._fold()
            finally:
                self._lock.release()

    def _fold(self) -> None:
        values = self.values
        count = len(values)
        if not count:
            return
        taken = values[:count]
        del values[:count]  # observations appended meanwhile are after these: they stay
        bounds, add_to_sum, bucket_incs = self._cells
        total = sum(taken)
        if total != total:  # a NaN among them (in no bucket): observe() each, as it would
            for amount in taken:
                self._observe(amount)
            return
        add_to_sum(total)
        # Sorted, each bucket's count is one binary search away: ~4x faster than finding
        # every observation's bucket in a Python loop. observe() counts an amount in the
        # first bucket whose bound is >= it, i.e. amounts <= bound: bisect_right.
        taken.sort()
        done = 0
        for inc, bound in zip(bucket_incs, bounds, strict=True):
            upto = bisect_right(taken, bound, done)
            if upto > done:
                inc(upto - done)
                done = upto
                if done == count:
                    break


class _Histogram(Histogram):
    """prometheus_client's ``Histogram``, whose collection first folds in the observations its
    series' bound recorders buffered (:class:`_PendingObservations`)."""

    _asyncsentinel_pending: tuple[_PendingObservations, ...] = ()

    def collect(self) -> Any:
        for pending in self._asyncsentinel_pending:
            pending.flush()
        return super().collect()


LevelReader = Callable[[], float | None]
"""Reads a level when the family is collected; ``None``: its owner is gone (reader dropped)."""


class _Gauge(Gauge):
    """prometheus_client's ``Gauge``, whose collection first sets the series whose level is read
    from callbacks (:meth:`PrometheusSink.level`) to the sum of their readers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # label values -> (child, its readers); changed under _levels_lock.
        self._asyncsentinel_levels: dict[tuple[str, ...], tuple[Any, list[LevelReader]]] = {}

    def collect(self) -> Any:
        with _levels_lock:
            for child, readers in self._asyncsentinel_levels.values():
                total = 0.0
                for read in list(readers):
                    value = read()
                    if value is None:
                        readers.remove(read)
                    else:
                        total += value
                child.set(total)
        return super().collect()


_levels_lock = threading.Lock()


def multiprocess_enabled() -> bool:
    """True when prometheus_client's multiprocess mode is on (``PROMETHEUS_MULTIPROC_DIR``)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _build(instrument: Instrument, registry: CollectorRegistry) -> Any:
    name, doc, labels = instrument.name, instrument.documentation, instrument.labels
    if instrument.kind == "counter":
        return Counter(name.removesuffix("_total"), doc, labels, registry=registry)
    if instrument.kind == "histogram":
        return _Histogram(name, doc, labels, registry=registry, buckets=instrument.buckets)
    return _Gauge(
        name, doc, labels, registry=registry, multiprocess_mode=instrument.multiprocess_mode
    )


def families_for(registry: CollectorRegistry) -> dict[str, Any]:
    """The metric families of every instrument, registered once on *registry*."""
    with _families_lock:
        families = _families_by_registry.get(registry)
        if families is None:
            families = {i.name: _build(i, registry) for i in ALL_INSTRUMENTS}
            _families_by_registry[registry] = families
        return families


class PrometheusSink:
    """Records observations into prometheus_client metrics, with bounded label cardinality."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, max_label_sets: int = 2000
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        self._families = families_for(self.registry)
        self._max_label_sets = max_label_sets
        # (instrument name, label values) -> child; the hot path is one dict lookup.
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._sets_per_family: dict[str, int] = {}
        # (instrument name, label values) -> the child's bound ``observe``/``inc``: recording is
        # one dict lookup and one call (this runs several times per HTTP request). Holds only
        # keys that have their own child, so it is bounded like ``_children``.
        self._recorders: dict[tuple[str, tuple[str, ...]], Callable[[float], None]] = {}
        # Re-entrant: creating a child allocates, which can run a garbage-collector finalizer
        # that records (SQLAlchemy finalizes a connection nobody closed; asyncsentinel reports
        # it) into another family in this same thread while the lock is held.
        self._lock = threading.RLock()
        for instrument in ALL_INSTRUMENTS:
            if not instrument.labels:
                # Unlabelled families expose a sample from the start (a 0 is information too).
                self._children[(instrument.name, ())] = self._families[instrument.name]

    def _child(self, instrument: Instrument, labels: tuple[str, ...]) -> Any:
        key = (instrument.name, labels)
        child = self._children.get(key)
        if child is not None:
            return child
        with self._lock:
            child = self._children.get(key)
            if child is not None:
                return child
            count = self._sets_per_family.get(instrument.name, 0)
            if count >= self._max_label_sets:
                labels = (OVERFLOW_LABEL,) * len(instrument.labels)
                overflow_key = (instrument.name, labels)
                child = self._children.get(overflow_key)
                if child is None:
                    child = self._families[instrument.name].labels(*labels)
                    self._children[overflow_key] = child
                return child
            child = self._families[instrument.name].labels(*labels)
            self._children[key] = child
            self._sets_per_family[instrument.name] = count + 1
            return child

    def record(self, instrument: Instrument, value: float, labels: tuple[str, ...]) -> None:
        recorder = self._recorders.get((instrument.name, labels))
        if recorder is None:
            recorder = self._recorder(instrument, labels)
        recorder(value)

    def _recorder(self, instrument: Instrument, labels: tuple[str, ...]) -> Callable[[float], None]:
        child = self._child(instrument, labels)
        recorder: Callable[[float], None] = (
            child.observe if instrument.kind == "histogram" else child.inc
        )
        key = (instrument.name, labels)
        if key in self._children:  # not folded into the overflow series: safe to remember
            self._recorders[key] = recorder
        return recorder

    def recorder(
        self,
        instrument: Instrument,
        labels: tuple[str, ...],
        on_error: Callable[[Exception], None],
    ) -> Callable[[float], None]:
        """:meth:`record` for one label set, bound once, for hot paths (one call per SQL
        statement). Never raises; errors go to *on_error*.

        Histograms buffer observations in-process (:class:`_PendingObservations`: an append
        instead of two locked updates and a bucket scan) and fold them in before every
        collection. In multiprocess mode, where values live in mmap files read by another
        process, they update the sum and the one bucket found by bisection directly, as
        ``observe()`` does minus its checks and scan. Gauges update their value cell directly.
        When prometheus_client lays its metrics out differently than 0.20 to 0.26 do, the
        public methods are used.
        """
        child = self._child(instrument, labels)
        cells = _histogram_cells(child) if instrument.kind == "histogram" else None
        family = self._families[instrument.name]
        if (
            cells is not None
            and isinstance(family, _Histogram)
            and getattr(getattr(child, "_sum", None), "_multiprocess", True) is False
        ):
            return self._buffered(family, child, cells, on_error)
        if cells is not None:
            bounds, add_to_sum, bucket_incs = cells
            observe = child.observe

            def observe_now(amount: float) -> None:
                try:
                    if amount != amount:  # NaN is in no bucket: leave it to observe()
                        observe(amount)
                        return
                    add_to_sum(amount)
                    # The first bound >= amount: what observe()'s "amount <= bound" scan finds.
                    bucket_incs[bisect_left(bounds, amount)](1)
                except Exception as exc:
                    on_error(exc)

            return observe_now
        record: Callable[[float], None] = self._recorder(instrument, labels)
        if instrument.kind == "gauge" and not getattr(child, "_is_most_recent", True):
            record = getattr(getattr(child, "_value", None), "inc", None) or record

        def record_contained(value: float) -> None:
            try:
                record(value)
            except Exception as exc:
                on_error(exc)

        return record_contained

    def _buffered(
        self,
        family: _Histogram,
        child: Any,
        cells: tuple[list[float], Callable[[float], None], list[Callable[[float], None]]],
        on_error: Callable[[Exception], None],
    ) -> Callable[[float], None]:
        with self._lock:
            # One buffer per series, shared by every sink on this registry.
            pending = getattr(child, "_asyncsentinel_buffer", None)
            if pending is None:
                pending = _PendingObservations(cells, child.observe)
                child._asyncsentinel_buffer = pending
                family._asyncsentinel_pending = (*family._asyncsentinel_pending, pending)
        values = pending.values
        append = values.append
        flush = pending.try_flush

        def observe_buffered(amount: float) -> None:
            try:
                append(amount)
                if len(values) >= _FLUSH_AT:
                    flush()
            except Exception as exc:
                on_error(exc)

        return observe_buffered

    def set(self, instrument: Instrument, value: float, labels: tuple[str, ...]) -> None:
        self._child(instrument, labels).set(value)

    def level(
        self, instrument: Instrument, labels: tuple[str, ...], read: LevelReader
    ) -> Callable[[], None] | None:
        """Read a gauge's level from *read* whenever the family is collected, instead of
        recording every change (a pool's used/idle/pending connections change twice per
        checkout). Several readers of one series add up. Returns the function that removes
        the reader, or ``None`` where levels must be recorded as changes: in multiprocess mode,
        whose collection runs in another process and reads the values from files."""
        family = self._families[instrument.name]
        if instrument.kind != "gauge" or not isinstance(family, _Gauge) or multiprocess_enabled():
            return None
        child = self._child(instrument, labels)
        key = tuple(child._labelvalues) if hasattr(child, "_labelvalues") else labels
        with _levels_lock:
            entry = family._asyncsentinel_levels.setdefault(key, (child, []))
            entry[1].append(read)

        def remove() -> None:
            with _levels_lock:
                readers = entry[1]
                if read in readers:
                    readers.remove(read)

        return remove
