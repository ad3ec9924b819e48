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
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import CodeType, FrameType
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
from asyncsentinel.frames import Location, is_user_code, user_culprit
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

_MAX_LOCATIONS = 4096
_MAX_ROUTE_RECORDERS = 1024
_ORIGIN_SEARCH_DEPTH = 64

Origin = tuple[CodeType, int]
"""A place in running code as (code object, instruction offset ``f_lasti``). Reading both costs
tens of nanoseconds; ``frame.f_lineno`` costs up to ~2 us (CPython decodes the line table), so
the line is computed from an origin only when a finding needs it."""


def origin_line(origin: Origin) -> int:
    """The source line of an :data:`Origin`."""
    code, offset = origin
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


def origin_location(origin: Origin) -> Location:
    """The :class:`Location` of an :data:`Origin`."""
    return _location(*origin)


def user_origin(frame: FrameType | None) -> Origin | None:
    """The first user-code frame from *frame* outwards, as an :data:`Origin` (no line yet)."""
    for _ in range(_ORIGIN_SEARCH_DEPTH):
        if frame is None:
            return None
        code = frame.f_code
        if is_user_code(code.co_filename):
            return code, frame.f_lasti
        frame = frame.f_back
    return None


# (id(code), f_lasti) -> (code, its Location). The code object is kept in the value, so its id
# cannot be reused by another code object while the entry exists. Bounded; cleared when full.
_locations: dict[tuple[int, int], tuple[CodeType, Location]] = {}


def _location(code: CodeType, offset: int) -> Location:
    key = (id(code), offset)
    known = _locations.get(key)
    if known is not None:
        return known[1]
    location = Location(code.co_filename, origin_line((code, offset)), code.co_qualname)
    if len(_locations) >= _MAX_LOCATIONS:
        _locations.clear()
    _locations[key] = (code, location)
    return location


def frame_location(frame: FrameType) -> Location:
    """The location *frame* is at, like :func:`~asyncsentinel.frames.location_of`, but
    remembered per instruction: stacks taken again at the same places (an N+1 in every request
    of a route) skip computing line numbers and building locations."""
    return _location(frame.f_code, frame.f_lasti)


def origins_to_stack(origins: list[Origin]) -> tuple[Location, ...]:
    """A stack captured as origins (innermost first) as locations, outermost first."""
    return tuple(_location(code, offset) for code, offset in reversed(origins))


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_SQLALCHEMY = f"{os.sep}sqlalchemy{os.sep}"
# Libraries whose locks reporting a finding takes (prometheus_client's are not re-entrant).
_LOCKING_LIBRARIES = (f"{os.sep}prometheus_client{os.sep}", f"{os.sep}opentelemetry{os.sep}")


def _interrupts_instrumentation(frame: FrameType | None) -> bool:
    """Whether a finalizer called from *frame* outwards interrupted asyncsentinel's own code or
    a metrics/tracing library's, which may hold a lock that reporting would take again.

    The finalizer's own frames (asyncsentinel's pool listener, then SQLAlchemy's finalizer and
    event dispatch) are skipped; every frame beyond them is what the collector interrupted.
    """
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    while frame is not None and _SQLALCHEMY in frame.f_code.co_filename:
        frame = frame.f_back
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_PACKAGE_DIR) or any(d in filename for d in _LOCKING_LIBRARIES):
            return True
        frame = frame.f_back
    return False


_monitors: weakref.WeakKeyDictionary[Dispatcher, DatabaseMonitor] = weakref.WeakKeyDictionary()
_monitors_lock = threading.Lock()


class PoolStats:
    """The live state of one connection pool, recorded into the pool instruments.

    Each instrument is bound once per pool name (:meth:`Dispatcher.recorder`): a checkout and
    its checkin make eight updates (pending, used, idle, wait and use time), so the lookups of
    ``record`` on each would cost more than the updates. Each is still one exact delta.
    """

    __slots__ = (
        "_create_time",
        "_dispatcher",
        "_idle",
        "_labels",
        "_pending",
        "_timeouts",
        "_use_time",
        "_used",
        "_wait_time",
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
        labels = self._labels = (name,)
        bind = self._dispatcher.recorder
        self._used = bind(DB_CONNECTION_COUNT, (name, "used"))
        self._idle = bind(DB_CONNECTION_COUNT, (name, "idle"))
        self._pending = bind(DB_CONNECTION_PENDING_REQUESTS, labels)
        self._wait_time = bind(DB_CONNECTION_WAIT_TIME, labels)
        self._use_time = bind(DB_CONNECTION_USE_TIME, labels)
        self._create_time = bind(DB_CONNECTION_CREATE_TIME, labels)
        self._timeouts = bind(DB_CONNECTION_TIMEOUTS, labels)

    def rename(self, name: str) -> None:
        """Move this pool's current levels to a new name (``instrument_engine(name=...)``)."""
        if name == self.name:
            return
        self._used(-self.used)
        self._idle(-self.idle)
        self._pending(-self.waiting)
        self._set_name(name)
        self._used(self.used)
        self._idle(self.idle)
        self._pending(self.waiting)
        if self.maximum is not None:
            self._dispatcher.set(DB_CONNECTION_MAX, self.maximum, self._labels)

    def wait_started(self) -> None:
        """A caller asks the pool for a connection."""
        self.waiting += 1
        self._pending(1)

    def wait_ended(self) -> None:
        """The caller got a connection, or gave up."""
        self.waiting -= 1
        self._pending(-1)

    def checked_out(self, *, from_idle: bool, wait_seconds: float) -> None:
        """A connection left the pool (*from_idle*: an open one; otherwise newly opened)."""
        self.used += 1
        self._used(1)
        if from_idle:
            self.idle -= 1
            self._idle(-1)
        self._wait_time(wait_seconds)

    def checked_in(self, *, use_seconds: float | None, to_idle: bool) -> None:
        """A connection came back (*to_idle*: still open and kept by the pool)."""
        self.used -= 1
        self._used(-1)
        if to_idle:
            self.idle += 1
            self._idle(1)
        if use_seconds is not None:
            self._use_time(use_seconds)

    def idle_closed(self) -> None:
        """An idle connection was closed (dispose, recycle, failed pre-ping, overflow)."""
        self.idle -= 1
        self._idle(-1)

    def set_levels(self, used: int, idle: int) -> None:
        """Set used/idle from the pool's own counters (pools that expose them exactly)."""
        if used != self.used:
            self._used(used - self.used)
            self.used = used
        if idle != self.idle:
            self._idle(idle - self.idle)
            self.idle = idle

    def wait_observed(self, wait_seconds: float) -> None:
        """Record the time a checkout took (pools whose levels come from :meth:`set_levels`)."""
        self._wait_time(wait_seconds)

    def use_observed(self, use_seconds: float) -> None:
        """Record how long a connection was held (pools using :meth:`set_levels`)."""
        self._use_time(use_seconds)

    def timed_out(self) -> None:
        """A checkout gave up waiting."""
        self._timeouts(1)

    def created(self, seconds: float) -> None:
        """A new connection was opened in *seconds*."""
        self._create_time(seconds)


class Checkout:
    """One connection out of its pool: since when, for which request, checked out where."""

    __slots__ = ("_culprit", "origin", "request", "returned", "start_ns", "stats", "still_out")

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
        self._culprit = culprit
        self.origin: Origin | None = None
        """Where the connection was checked out, as :func:`user_origin` found it; turned into
        :attr:`culprit` only if a leak is reported."""
        self.returned = False
        self.still_out = still_out
        """Extra check for pools that can take a connection back without telling us."""

    @property
    def culprit(self) -> Location | None:
        """The user-code line that checked the connection out, when known."""
        if self._culprit is None and self.origin is not None:
            self._culprit = origin_location(self.origin)
        return self._culprit

    @culprit.setter
    def culprit(self, value: Location | None) -> None:
        self._culprit = value

    def is_out(self) -> bool:
        """True while the connection has not come back to its pool."""
        if self.returned:
            return False
        return self.still_out() if self.still_out is not None else True


class RequestDb:
    """What one HTTP request did with the database.

    Created at a request's first statement or checkout; the collections only some requests
    need (N+1 flags, checkouts, findings reported once) are created on first use.
    """

    __slots__ = ("checkouts", "count", "duration_ns", "flagged", "owner", "reported", "shapes")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        """The monitor that counts statements for this request (one, even if several exist)."""
        self.count = 0
        self.duration_ns = 0
        self.shapes: dict[str, int] = {}
        self.flagged: dict[str, tuple[list[Origin], dict[str, EvidenceValue]]] | None = None
        """Shapes that reached the N+1 threshold: stack at that moment (origins, innermost
        first; made locations when reported) and evidence."""
        self.checkouts: list[Checkout] | None = None
        """Connections checked out during the request (at most ``MAX_CHECKOUTS_PER_REQUEST``)."""
        self.reported: set[str] | None = None
        """Findings already reported for this request (e.g. one pool_exhausted per pool)."""

    def remember_checkout(self, checkout: Checkout) -> bool:
        """Keep *checkout* for the leak check at the request's end; ``False`` when full."""
        checkouts = self.checkouts
        if checkouts is None:
            checkouts = self.checkouts = []
        elif len(checkouts) >= MAX_CHECKOUTS_PER_REQUEST:
            return False
        checkouts.append(checkout)
        return True

    def first_time(self, key: str) -> bool:
        """``True`` the first time *key* is asked about in this request (report once)."""
        reported = self.reported
        if reported is None:
            reported = self.reported = set()
        elif key in reported:
            return False
        reported.add(key)
        return True

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
        # Garbage-collected connections not reported yet (SimpleQueue.put is safe to call from
        # a finalizer); ``deferred`` tells the next checkout or request end to report them.
        self._deferred: queue.SimpleQueue[tuple[Checkout, int]] = queue.SimpleQueue()
        self.deferred = False
        # http_route -> bound recorder of asyncsentinel_request_db_queries (routes are bounded
        # by max_routes already; this bound only keeps the dictionary small).
        self._queries_by_route: dict[str, Callable[[float], None]] = {}

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
        self, db: RequestDb, shape: str, stack: list[Origin], evidence: dict[str, Any]
    ) -> None:
        """Remember that *shape* reached the N+1 threshold; reported when the request ends.

        *stack* is taken as origins (innermost first): the statement that reached the threshold
        pays for walking the frames only, the locations are made when the request ends.
        """
        if db.flagged is None:
            db.flagged = {}
        db.flagged[shape] = (stack, evidence)

    def finish_request(self, state: RequestState) -> None:
        """Observe the statement count, annotate the span, report N+1, plan leak checks."""
        if self.deferred:
            self.report_deferred()
        db: RequestDb | None = state.extras.get(REQUEST_KEY)
        count = db.count if db is not None else 0
        route = state.route
        record = self._queries_by_route.get(route)
        if record is None:
            record = self.dispatcher.recorder(REQUEST_DB_QUERIES, (route,))
            if len(self._queries_by_route) >= _MAX_ROUTE_RECORDERS:
                self._queries_by_route.clear()
            self._queries_by_route[route] = record
        record(count)
        if db is None:
            return
        state.span_attributes["asyncsentinel.db.query_count"] = count
        state.span_attributes["asyncsentinel.db.duration"] = db.duration_ns / 1e9
        threshold = self.settings.n_plus_one_threshold
        for shape, (origins, base) in (db.flagged or {}).items():
            stack = origins_to_stack(origins)
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
        if db.checkouts:
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
        """A checked-out connection was garbage-collected instead of being returned.

        This runs inside the garbage collector (SQLAlchemy's finalizer of the connection), that
        is in the middle of whatever code allocated. If that was asyncsentinel's, a metrics or
        a tracing library's, it may hold a lock that reporting needs again (prometheus_client's
        are not re-entrant): then the report waits for :meth:`report_deferred`, which the next
        checkout and the next request end call.
        """
        now = time.perf_counter_ns()
        if _interrupts_instrumentation(sys._getframe(1)):
            self._deferred.put((checkout, now))
            self.deferred = True
            return
        self._report_collected(checkout, now)

    def report_deferred(self) -> None:
        """Report the garbage-collected connections that could not be reported at once."""
        self.deferred = False
        while True:
            try:
                checkout, when = self._deferred.get_nowait()
            except queue.Empty:
                return
            try:
                self._report_collected(checkout, when)
            except Exception as exc:
                self.dispatcher.report_error("source.sqlalchemy.leaks", exc)

    def _report_collected(self, checkout: Checkout, when: int) -> None:
        self._report_leak(
            checkout,
            "a connection was garbage-collected without being returned to its pool; close "
            "connections and sessions explicitly (async with ...)",
            garbage_collected=True,
            now=when,
        )

    def _report_leak(
        self, checkout: Checkout, message: str, *, garbage_collected: bool, now: int = 0
    ) -> None:
        held = ((now or time.perf_counter_ns()) - checkout.start_ns) / 1e9
        self.dispatcher.emit(
            Finding.create(
                CONNECTION_LEAKED,
                message,
                culprit=checkout.culprit,
                evidence={
                    # A Session collected with it open is reported too, as object="session".
                    "object": "connection",
                    "pool": checkout.stats.name,
                    "held_seconds": round(held, 6),
                    "garbage_collected": garbage_collected,
                },
                request=checkout.request,
            )
        )

    def cancel_leak_checks(self) -> None:
        """Forget planned leak checks (the application is stopping)."""
        if self.deferred:
            self.report_deferred()
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
            if isinstance(db, RequestDb) and not db.first_time(f"pool_exhausted:{stats.name}"):
                return  # one per pool per request; the metrics still count every wait
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
