"""Database bookkeeping shared by the SQLAlchemy and asyncpg sources (no driver imported here).

* :class:`PoolStats` — the live state of one connection pool (used, idle, waiting), fed to the
  ``db_client_connection_*`` instruments. Gauges are recorded as deltas, so two pools sharing a
  name (an engine's pool before and after ``dispose()``) add up instead of overwriting each other.
* :class:`Checkout` — one connection checked out of a pool: when, by which request and line.
* :class:`RequestDb` — what one HTTP request did with the database, in
  ``RequestState.extras["sqlalchemy"]``: statement count and time, executions per statement
  shape (for N+1 detection), connections it checked out (for leak detection).
* :class:`DatabaseMonitor` — turns those into request metrics, span attributes and findings.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from asyncsentinel.config import Settings
from asyncsentinel.context import RequestState
from asyncsentinel.findings import (
    CONNECTION_LEAKED,
    N_PLUS_ONE,
    POOL_EXHAUSTED,
    SLOW_QUERY,
    Dispatcher,
    EvidenceValue,
    Finding,
)
from asyncsentinel.frames import Location, user_culprit
from asyncsentinel.instruments import (
    DB_CONNECTION_COUNT,
    DB_CONNECTION_CREATE_TIME,
    DB_CONNECTION_MAX,
    DB_CONNECTION_PENDING_REQUESTS,
    DB_CONNECTION_TIMEOUTS,
    DB_CONNECTION_USE_TIME,
    DB_CONNECTION_WAIT_TIME,
    REQUEST_DB_QUERIES,
)

REQUEST_KEY = "sqlalchemy"
"""Key of :class:`RequestDb` in ``RequestState.extras`` (shared by every database source)."""
MAX_SHAPES_PER_REQUEST = 256
"""Distinct statement shapes counted per request; later new shapes are not tracked (memory)."""
MAX_CHECKOUTS_PER_REQUEST = 64
"""Checkouts remembered per request for leak detection."""
MAX_NAME_CHARS = 200
"""Longest pool name used as a label value."""
_SHAPE_IN_MESSAGE = 200

_monitors: weakref.WeakKeyDictionary[Dispatcher, DatabaseMonitor] = weakref.WeakKeyDictionary()
_monitors_lock = threading.Lock()


class PoolStats:
    """The live state of one connection pool, recorded into the pool instruments."""

    __slots__ = (
        "_dispatcher",
        "_idle_labels",
        "_labels",
        "_used_labels",
        "idle",
        "maximum",
        "name",
        "used",
        "waiting",
    )

    def __init__(self, dispatcher: Dispatcher, name: str, maximum: int | None = None) -> None:
        self._dispatcher = dispatcher
        self.used = 0
        """Connections checked out now."""
        self.idle = 0
        """Open connections resting in the pool."""
        self.waiting = 0
        """Callers inside a checkout right now."""
        self.maximum = maximum
        self._set_name(name)
        if maximum is not None:
            dispatcher.set(DB_CONNECTION_MAX, maximum, self._labels)

    def _set_name(self, name: str) -> None:
        self.name = name
        self._labels = (name,)
        self._used_labels = (name, "used")
        self._idle_labels = (name, "idle")

    def rename(self, name: str) -> None:
        """Move this pool's current levels to a new name (``instrument_engine(name=...)``)."""
        if name == self.name:
            return
        record = self._dispatcher.record
        record(DB_CONNECTION_COUNT, -self.used, self._used_labels)
        record(DB_CONNECTION_COUNT, -self.idle, self._idle_labels)
        record(DB_CONNECTION_PENDING_REQUESTS, -self.waiting, self._labels)
        self._set_name(name)
        record(DB_CONNECTION_COUNT, self.used, self._used_labels)
        record(DB_CONNECTION_COUNT, self.idle, self._idle_labels)
        record(DB_CONNECTION_PENDING_REQUESTS, self.waiting, self._labels)
        if self.maximum is not None:
            self._dispatcher.set(DB_CONNECTION_MAX, self.maximum, self._labels)

    def wait_started(self) -> None:
        """A caller asks the pool for a connection."""
        self.waiting += 1
        self._dispatcher.record(DB_CONNECTION_PENDING_REQUESTS, 1, self._labels)

    def wait_ended(self) -> None:
        """The caller got a connection, or gave up."""
        self.waiting -= 1
        self._dispatcher.record(DB_CONNECTION_PENDING_REQUESTS, -1, self._labels)

    def checked_out(self, *, from_idle: bool, wait_seconds: float) -> None:
        """A connection left the pool (*from_idle*: an open one; otherwise newly opened)."""
        record = self._dispatcher.record
        self.used += 1
        record(DB_CONNECTION_COUNT, 1, self._used_labels)
        if from_idle:
            self.idle -= 1
            record(DB_CONNECTION_COUNT, -1, self._idle_labels)
        record(DB_CONNECTION_WAIT_TIME, wait_seconds, self._labels)

    def checked_in(self, *, use_seconds: float | None, to_idle: bool) -> None:
        """A connection came back (*to_idle*: still open and kept by the pool)."""
        record = self._dispatcher.record
        self.used -= 1
        record(DB_CONNECTION_COUNT, -1, self._used_labels)
        if to_idle:
            self.idle += 1
            record(DB_CONNECTION_COUNT, 1, self._idle_labels)
        if use_seconds is not None:
            record(DB_CONNECTION_USE_TIME, use_seconds, self._labels)

    def idle_closed(self) -> None:
        """An idle connection was closed (dispose, recycle, failed pre-ping, overflow)."""
        self.idle -= 1
        self._dispatcher.record(DB_CONNECTION_COUNT, -1, self._idle_labels)

    def set_levels(self, used: int, idle: int) -> None:
        """Set used/idle from the pool's own counters (pools that expose them exactly)."""
        record = self._dispatcher.record
        if used != self.used:
            record(DB_CONNECTION_COUNT, used - self.used, self._used_labels)
            self.used = used
        if idle != self.idle:
            record(DB_CONNECTION_COUNT, idle - self.idle, self._idle_labels)
            self.idle = idle

    def wait_observed(self, wait_seconds: float) -> None:
        """Record the time a checkout took (pools whose levels come from :meth:`set_levels`)."""
        self._dispatcher.record(DB_CONNECTION_WAIT_TIME, wait_seconds, self._labels)

    def use_observed(self, use_seconds: float) -> None:
        """Record how long a connection was held (pools using :meth:`set_levels`)."""
        self._dispatcher.record(DB_CONNECTION_USE_TIME, use_seconds, self._labels)

    def timed_out(self) -> None:
        """A checkout gave up waiting."""
        self._dispatcher.record(DB_CONNECTION_TIMEOUTS, 1, self._labels)

    def created(self, seconds: float) -> None:
        """A new connection was opened in *seconds*."""
        self._dispatcher.record(DB_CONNECTION_CREATE_TIME, seconds, self._labels)


class Checkout:
    """One connection out of its pool: since when, for which request, checked out where."""

    __slots__ = ("culprit", "request", "returned", "start_ns", "stats", "still_out")

    def __init__(
        self,
        stats: PoolStats,
        start_ns: int,
        request: RequestState | None,
        culprit: Location | None = None,
        still_out: Callable[[], bool] | None = None,
    ) -> None:
        self.stats = stats
        self.start_ns = start_ns
        self.request = request
        self.culprit = culprit
        self.returned = False
        self.still_out = still_out
        """Extra check for pools that can take a connection back without telling us."""

    def is_out(self) -> bool:
        """True while the connection has not come back to its pool."""
        if self.returned:
            return False
        return self.still_out() if self.still_out is not None else True


class RequestDb:
    """What one HTTP request did with the database."""

    __slots__ = ("checkouts", "count", "duration_ns", "flagged", "once", "owner", "shapes")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        """The monitor that counts statements for this request (one, even if several exist)."""
        self.count = 0
        self.duration_ns = 0
        self.shapes: dict[str, int] = {}
        self.flagged: dict[str, tuple[tuple[Location, ...], dict[str, EvidenceValue]]] = {}
        """Shapes that reached the N+1 threshold: stack at that moment and evidence."""
        self.checkouts: list[Checkout] = []
        self.once: set[str] = set()
        """Findings already reported for this request (e.g. one pool_exhausted per pool)."""

    def add(self, shape: str, duration_ns: int) -> int:
        """Count one statement; returns how often its shape ran in this request (0: untracked)."""
        self.count += 1
        self.duration_ns += duration_ns
        shapes = self.shapes
        seen = shapes.get(shape)
        if seen is None:
            if len(shapes) >= MAX_SHAPES_PER_REQUEST:
                return 0
            seen = 0
        seen += 1
        shapes[shape] = seen
        return seen


class DatabaseMonitor:
    """Per-request database accounting and the findings common to every database source.

    One per :class:`Dispatcher` (that is, per Sentinel): get it with :meth:`shared`, so the
    SQLAlchemy and asyncpg sources of one Sentinel count into the same :class:`RequestDb`.
    """

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self._leak_checks: set[asyncio.TimerHandle] = set()

    @classmethod
    def shared(cls, settings: Settings, dispatcher: Dispatcher) -> DatabaseMonitor:
        """The monitor of *dispatcher*'s Sentinel, created on first use."""
        with _monitors_lock:
            monitor = _monitors.get(dispatcher)
            if monitor is None:
                monitor = _monitors[dispatcher] = cls(settings, dispatcher)
            return monitor

    # --- per request ---------------------------------------------------------------------------
    def request(self, state: RequestState) -> RequestDb | None:
        """This request's :class:`RequestDb`, created on first use; ``None`` if another monitor
        (a second Sentinel in the process) already counts for it."""
        extras = state.extras
        db = extras.get(REQUEST_KEY)
        if db is None:
            db = extras[REQUEST_KEY] = RequestDb(self)
        elif db.owner is not self:
            return None
        return db if isinstance(db, RequestDb) else None

    def flag_n_plus_one(
        self, db: RequestDb, shape: str, stack: tuple[Location, ...], evidence: dict[str, Any]
    ) -> None:
        """Remember that *shape* reached the N+1 threshold; reported when the request ends."""
        db.flagged[shape] = (stack, evidence)

    def finish_request(self, state: RequestState) -> None:
        """Observe the statement count, annotate the span, report N+1, plan leak checks."""
        db: RequestDb | None = state.extras.get(REQUEST_KEY)
        count = db.count if db is not None else 0
        self.dispatcher.record(REQUEST_DB_QUERIES, count, (state.route,))
        if db is None:
            return
        state.span_attributes["asyncsentinel.db.query_count"] = count
        state.span_attributes["asyncsentinel.db.duration"] = db.duration_ns / 1e9
        threshold = self.settings.n_plus_one_threshold
        for shape, (stack, base) in db.flagged.items():
            executions = db.shapes.get(shape, threshold)
            evidence = {**base, "statement": shape, "count": executions, "threshold": threshold}
            self.dispatcher.emit(
                Finding.create(
                    N_PLUS_ONE,
                    f"one statement ran {executions} times in this request (N+1 queries; "
                    f"threshold {threshold}); load the rows in one query (selectinload, a join "
                    f"or IN): {_short(shape)}",
                    culprit=user_culprit(stack),
                    stack=stack,
                    evidence=evidence,
                    request=state,
                )
            )
        outstanding = [c for c in db.checkouts if c.is_out()]
        if outstanding:
            self._plan_leak_check(outstanding)

    # --- connections that never came back --------------------------------------------------------
    def _plan_leak_check(self, checkouts: list[Checkout]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a request always ends on its loop; nothing sensible to schedule otherwise
        handle: asyncio.TimerHandle | None = None

        def check() -> None:
            if handle is not None:
                self._leak_checks.discard(handle)
            try:
                self.check_leaks(checkouts)
            except Exception as exc:
                self.dispatcher.report_error("source.sqlalchemy.leaks", exc)

        handle = loop.call_later(self.settings.connection_leak_seconds, check)
        self._leak_checks.add(handle)

    def check_leaks(self, checkouts: list[Checkout]) -> None:
        """Report each checkout that is still out (its request finished a while ago)."""
        after = self.settings.connection_leak_seconds
        for checkout in checkouts:
            if not checkout.is_out():
                continue
            self._report_leak(
                checkout,
                f"a connection checked out by this request was still checked out {after:g}s "
                f"after the request finished; close it (async with engine.connect()/session)",
                garbage_collected=False,
            )

    def connection_garbage_collected(self, checkout: Checkout) -> None:
        """A checked-out connection was garbage-collected instead of being returned."""
        self._report_leak(
            checkout,
            "a connection was garbage-collected without being returned to its pool; close "
            "connections and sessions explicitly (async with ...)",
            garbage_collected=True,
        )

    def _report_leak(self, checkout: Checkout, message: str, *, garbage_collected: bool) -> None:
        held = (time.perf_counter_ns() - checkout.start_ns) / 1e9
        self.dispatcher.emit(
            Finding.create(
                CONNECTION_LEAKED,
                message,
                culprit=checkout.culprit,
                evidence={
                    "pool": checkout.stats.name,
                    "held_seconds": round(held, 6),
                    "garbage_collected": garbage_collected,
                },
                request=checkout.request,
            )
        )

    def cancel_leak_checks(self) -> None:
        """Forget planned leak checks (the application is stopping)."""
        for handle in list(self._leak_checks):
            handle.cancel()
        self._leak_checks.clear()

    # --- findings raised while a statement or a checkout runs ------------------------------------
    def pool_exhausted(
        self,
        stats: PoolStats,
        *,
        wait_seconds: float,
        timed_out: bool,
        stack: tuple[Location, ...],
        evidence: dict[str, EvidenceValue],
        state: RequestState | None,
    ) -> None:
        """A checkout waited too long for a free connection, or gave up."""
        if state is not None:
            db = state.extras.get(REQUEST_KEY)
            if isinstance(db, RequestDb):
                key = f"pool_exhausted:{stats.name}"
                if key in db.once:
                    return  # one per pool per request; the metrics still count every wait
                db.once.add(key)
        what = "timed out waiting" if timed_out else f"waited {wait_seconds:.3f}s"
        self.dispatcher.emit(
            Finding.create(
                POOL_EXHAUSTED,
                f"a checkout from pool {stats.name!r} {what} for a free connection "
                f"({stats.used} in use, {stats.waiting} waiting); the pool is too small for the "
                f"load or connections are held too long",
                culprit=user_culprit(stack),
                stack=stack,
                evidence={
                    "pool": stats.name,
                    "used": stats.used,
                    "waiters": stats.waiting,
                    "wait_seconds": round(wait_seconds, 6),
                    "timed_out": timed_out,
                    **evidence,
                },
                request=state,
            )
        )

    def slow_query(
        self,
        shape: str,
        seconds: float,
        stack: tuple[Location, ...],
        evidence: dict[str, EvidenceValue],
    ) -> None:
        """A statement took longer than ``slow_query_seconds``."""
        limit = self.settings.slow_query_seconds
        self.dispatcher.emit(
            Finding.create(
                SLOW_QUERY,
                f"a statement took {seconds:.3f}s (slow_query_seconds={limit:g}): {_short(shape)}",
                culprit=user_culprit(stack),
                stack=stack,
                evidence={**evidence, "statement": shape, "duration_seconds": round(seconds, 6)},
            )
        )


def _short(shape: str) -> str:
    return shape if len(shape) <= _SHAPE_IN_MESSAGE else shape[: _SHAPE_IN_MESSAGE - 1] + "…"
