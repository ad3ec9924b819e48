"""Prometheus sink: turns the instrument catalogue into prometheus_client metric families.

One set of metric families exists per ``CollectorRegistry`` (several :class:`Sentinel` objects on
one registry share it, as metrics of one process must). Each family holds at most
``max_label_sets`` label combinations; past that, new combinations are folded into one series
whose label values are all ``__overflow__``, so no input can grow the scrape without bound.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from asyncsentinel.instruments import ALL_INSTRUMENTS, Instrument

OVERFLOW_LABEL = "__overflow__"

_families_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)
_families_lock = threading.Lock()


def multiprocess_enabled() -> bool:
    """True when prometheus_client's multiprocess mode is on (``PROMETHEUS_MULTIPROC_DIR``)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _build(instrument: Instrument, registry: CollectorRegistry) -> Any:
    name, doc, labels = instrument.name, instrument.documentation, instrument.labels
    if instrument.kind == "counter":
        return Counter(name.removesuffix("_total"), doc, labels, registry=registry)
    if instrument.kind == "histogram":
        return Histogram(name, doc, labels, registry=registry, buckets=instrument.buckets)
    return Gauge(
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
        self._lock = threading.Lock()
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

    def set(self, instrument: Instrument, value: float, labels: tuple[str, ...]) -> None:
        self._child(instrument, labels).set(value)
