"""Per-request database accounting and the findings common to every database source.

:class:`DatabaseMonitor` (one per Sentinel, shared by the SQLAlchemy and asyncpg sources; no
driver imported here) turns the bookkeeping of :mod:`.database_accounting` — pool levels,
checkouts, statements per request — into the ``asyncsentinel_request_db_queries`` metric, the
``asyncsentinel.db.*`` span attributes and the ``n_plus_one``, ``connection_leaked``,
``pool_exhausted`` and ``slow_query`` findings.
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
from types import FrameType
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
from asyncsentinel.frames import PACKAGE_PREFIX, Location, Origin, origins_to_stack, user_culprit
from asyncsentinel.instruments import REQUEST_DB_QUERIES
from asyncsentinel.sources.database_accounting import Checkout, PoolStats, RequestDb

_SHAPE_IN_MESSAGE = 200
_MAX_ROUTE_RECORDERS = 1024
_MAX_REMEMBERED_STACKS = 1000  # N+1 stacks kept per (route, shape, line)

_SQLALCHEMY = f"{os.sep}sqlalchemy{os.sep}"
# Libraries whose locks reporting a finding takes (prometheus_client's are not re-entrant).
_LOCKING_LIBRARIES = (f"{os.sep}prometheus_client{os.sep}", f"{os.sep}opentelemetry{os.sep}")


def _interrupts_instrumentation(frame: FrameType | None) -> bool:
    """Whether a finalizer called from *frame* outwards interrupted asyncsentinel's own code or
    a metrics/tracing library's, which may hold a lock that reporting would take again.

    The finalizer's own frames (asyncsentinel's pool listener, then SQLAlchemy's finalizer and
    event dispatch) are skipped; every frame beyond them is what the collector interrupted.
    """
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_PREFIX):
        frame = frame.f_back
    while frame is not None and _SQLALCHEMY in frame.f_code.co_filename:
        frame = frame.f_back
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(PACKAGE_PREFIX) or any(d in filename for d in _LOCKING_LIBRARIES):
            return True
        frame = frame.f_back
    return False


_monitors: weakref.WeakKeyDictionary[Dispatcher, DatabaseMonitor] = weakref.WeakKeyDictionary()
_monitors_lock = threading.Lock()


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
        # (route, shape, innermost user frame) -> the stack of the first N+1 seen there.
        self._n_plus_one_stacks: dict[tuple[str, str, Origin | None], tuple[Location, ...]] = {}

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
        db = state.db
        if db is None:
            db = state.db = RequestDb(self)
        elif db.owner is not self:
            return None
        return db if isinstance(db, RequestDb) else None

    def flag_n_plus_one(
        self,
        request: RequestState,
        db: RequestDb,
        shape: str,
        origin: Origin | None,
        walk: Callable[[], list[Origin]],
        evidence: dict[str, Any],
    ) -> None:
        """Remember that *shape* reached the N+1 threshold; reported when the request ends.

        *origin* is the innermost user frame of the statement, *walk* takes the whole stack.
        Every request of an endpoint with an N+1 reaches the threshold at the same line, by the
        same path: the stack (~9 µs for 40 frames, each ``f_back`` makes a frame object, and
        as much again to make locations of it) is taken the first time only and reused for the
        same route, shape and line. Bounded; cleared when full.
        """
        key = (request.route, shape, origin)
        stack = self._n_plus_one_stacks.get(key)
        if stack is None:
            stack = origins_to_stack(walk())
            if len(self._n_plus_one_stacks) >= _MAX_REMEMBERED_STACKS:
                self._n_plus_one_stacks.clear()
            self._n_plus_one_stacks[key] = stack
        if db.flagged is None:
            db.flagged = {}
        db.flagged[shape] = (stack, evidence)

    def finish_request(self, state: RequestState) -> None:
        """Observe the statement count, annotate the span, report N+1, plan leak checks."""
        if self.deferred:
            self.report_deferred()
        db: RequestDb | None = state.db
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
        for shape, (stack, base) in (db.flagged or {}).items():
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
            db = state.db
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
