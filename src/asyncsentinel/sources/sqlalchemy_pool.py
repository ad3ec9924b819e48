"""SQLAlchemy pool accounting: checkouts, waits, timeouts, leaked connections.

What asyncsentinel knows per engine is in :mod:`.sqlalchemy_engines`; stacks across SQLAlchemy's
asyncio greenlets (for culprits) in :mod:`.sqlalchemy_stacks`.

How pool accounting is wired (all of it removed again by :meth:`SQLAlchemySource.uninstall`):

* ``Engine.raw_connection`` — the one door through which every ``Connection`` (sync, or the
  sync side of an ``AsyncEngine``) gets a pooled connection — is wrapped at class level and calls
  :meth:`PoolTracker.checkout`. Only a wrapper can time the wait, count the callers waiting and
  see ``QueuePool limit ... reached``: the pool's ``checkout`` event fires after the wait and
  does not say which pool it belongs to.
* Class-level pool events (``checkin``, ``close``, ``detach``, ``connect``) and the dialect's
  ``connect`` method, wrapped (:mod:`.sqlalchemy_dialects` calls :meth:`PoolTracker.connected`),
  do the rest. They find the pool's bookkeeping in
  ``connection_record.info`` — the dictionary SQLAlchemy keeps per DBAPI connection for event
  handlers — under a key private to the tracker.

Pool types with a fixed set of connections per caller (``StaticPool``,
``SingletonThreadPool``, ``AssertionPool``, used with SQLite in memory) have no pool metrics:
they hand one connection to several callers, so "used" and "waiting" mean nothing there.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool, Pool, QueuePool

from asyncsentinel.context import current_request, current_request_var
from asyncsentinel.findings import Dispatcher, EvidenceValue
from asyncsentinel.sources.database import DatabaseMonitor
from asyncsentinel.sources.database_accounting import Checkout, PoolStats
from asyncsentinel.sources.sqlalchemy_engines import EngineInfo
from asyncsentinel.sources.sqlalchemy_stacks import origin_here, stack_here

_perf_ns = time.perf_counter_ns
_tracker_ids = itertools.count(1)
_MAX_PENDING_CONNECTS = 256  # connections opened whose pool connect event has not run yet


def _noop_weakref_callback(_ref: weakref.ref[Any]) -> None:
    """A weakref with a callback is cleared before finalizers run, even in reference cycles
    (SQLAlchemy's fairy finalizer relies on the same; cpython gh-135552)."""


class RecordState:
    """Per DBAPI connection (in ``connection_record.info``): its pool, and its checkout if out."""

    __slots__ = ("checkout", "fairy_ref", "open", "stats")

    def __init__(self, stats: PoolStats) -> None:
        self.stats = stats
        self.open = True
        self.checkout: Checkout | None = None
        self.fairy_ref: weakref.ref[Any] | None = None


def pool_maximum(pool: Pool) -> int | None:
    """``pool_size + max_overflow`` of a bounded QueuePool, else ``None``.

    ``QueuePool`` has no public accessor for ``max_overflow``; ``_max_overflow`` is the same
    attribute in SQLAlchemy 2.0 and 2.1.
    """
    if not isinstance(pool, QueuePool):
        return None
    max_overflow = getattr(pool, "_max_overflow", -1)
    size = pool.size()
    if not isinstance(max_overflow, int) or max_overflow < 0 or size <= 0:
        return None
    return size + max_overflow


def pool_evidence(pool: Pool, info: EngineInfo) -> dict[str, EvidenceValue]:
    """The configuration and state of *pool*, for a finding."""
    evidence: dict[str, EvidenceValue] = {"db_system_name": info.system}
    if isinstance(pool, QueuePool):
        evidence["pool_size"] = pool.size()
        max_overflow = getattr(pool, "_max_overflow", None)
        if isinstance(max_overflow, int):
            evidence["max_overflow"] = max_overflow
        evidence["overflow_in_use"] = max(0, pool.overflow())
        evidence["pool_timeout_seconds"] = float(pool.timeout())
    return evidence


class PoolTracker:
    """Connection accounting of every tracked SQLAlchemy pool, for one source."""

    def __init__(self, monitor: DatabaseMonitor, dispatcher: Dispatcher) -> None:
        self._monitor = monitor
        self._dispatcher = dispatcher
        self._wait_limit = monitor.settings.pool_wait_seconds
        self._stats: weakref.WeakKeyDictionary[Pool, PoolStats] = weakref.WeakKeyDictionary()
        # Keys unique per tracker (not per id(), which a later tracker may reuse in tests), so a
        # connection checked out under one Sentinel is never accounted by another.
        number = next(_tracker_ids)
        self._key = f"asyncsentinel.{number}.record"
        self._created_key = f"asyncsentinel.{number}.create_ns"
        self.listeners: tuple[tuple[type[Any], str, Callable[..., Any]], ...] = (
            (Pool, "checkin", self._on_checkin),
            (Pool, "close", self._on_close),
            (Pool, "detach", self._on_detach),
            (Pool, "connect", self._on_connect),
        )
        """(target, event, function) for ``event.listen`` / ``event.remove``."""
        # id(new DBAPI connection) -> (it, nanoseconds to open it), until its pool's connect
        # event files the time with its connection record. Bounded; cleared when full.
        self._connect_times: dict[int, tuple[Any, int]] = {}

    # --- pools -----------------------------------------------------------------------------------
    def stats_for(self, pool: Pool, info: EngineInfo) -> PoolStats | None:
        """The :class:`PoolStats` of *pool* (created on first sight); ``None`` if untracked.

        Remembered on *info* for the next checkout: one weak reference call instead of a
        ``WeakKeyDictionary`` lookup and an ``isinstance`` check.
        """
        known = info.pool
        if known is not None and known() is pool:
            return info.pool_stats
        stats = self._stats.get(pool)
        if stats is None and isinstance(pool, QueuePool | NullPool):
            stats = self._stats[pool] = PoolStats(self._dispatcher, info.name, pool_maximum(pool))
        info.pool, info.pool_stats = weakref.ref(pool), stats
        return stats

    def rename(self, pool: Pool, name: str) -> None:
        """Move *pool*'s metrics to a new pool name."""
        stats = self._stats.get(pool)
        if stats is not None:
            stats.rename(name)

    def pools(self) -> Iterator[tuple[Pool, PoolStats]]:
        """Tracked pools that are still alive."""
        return iter(list(self._stats.items()))

    # --- checkout: Engine.raw_connection -------------------------------------------------------
    def checkout(self, engine: Any, original: Callable[[Any], Any], info: EngineInfo) -> Any:
        """Run ``Engine.raw_connection`` (*original*), timing and accounting the checkout."""
        if self._monitor.deferred:
            self._monitor.report_deferred()
        pool = engine.pool
        known = info.pool
        if known is not None and known() is pool:  # stats_for()'s usual answer, without a call
            stats = info.pool_stats
        else:
            try:
                stats = self.stats_for(pool, info)
            except Exception as exc:
                self._dispatcher.report_error("source.sqlalchemy.pool", exc)
                stats = None
        if stats is None:
            return original(engine)
        stats.wait_started()
        start = _perf_ns()
        try:
            fairy = original(engine)
        except sa_exc.TimeoutError:
            try:
                self._timed_out(stats, pool, info, start)
            except Exception as exc:
                self._dispatcher.report_error("source.sqlalchemy.pool", exc)
            raise
        finally:
            stats.wait_ended()
        try:
            self._checked_out(stats, pool, info, fairy, start)
        except Exception as exc:
            self._dispatcher.report_error("source.sqlalchemy.pool", exc)
        return fairy

    def _checked_out(
        self, stats: PoolStats, pool: Pool, info: EngineInfo, fairy: Any, start: int
    ) -> None:
        end = _perf_ns()
        record_info = fairy.info
        created_ns = record_info.pop(self._created_key, 0)
        if created_ns:
            stats.created(created_ns / 1e9)
        state = record_info.get(self._key)
        if state is not None and state.checkout is not None:
            # Never seen checked in (should not happen with QueuePool): close the books first.
            self._came_back(state)
        from_idle = state is not None and state.open and state.stats is stats
        if not from_idle:
            state = record_info[self._key] = RecordState(stats)
        assert state is not None
        wait_ns = end - start
        stats.checked_out(from_idle=from_idle, wait_seconds=wait_ns / 1e9)
        request = current_request_var.get()
        checkout = Checkout(stats, end, request)
        state.checkout = checkout
        state.fairy_ref = weakref.ref(fairy, _noop_weakref_callback)
        if request is not None:
            db = request.db  # DatabaseMonitor.request()'s usual answer
            if db is None or db.owner is not self._monitor:
                db = self._monitor.request(request)
            if db is not None and db.remember_checkout(checkout):
                # Where, for a leak report: the frame's code and offset only (tens of ns);
                # the line and Location are computed if that connection ever leaks.
                checkout.origin = origin_here(skip=3)  # this, checkout(), the source's
        # Opening a connection is not waiting for the pool: judge the wait without it.
        waited = (wait_ns - created_ns) / 1e9
        if waited > self._wait_limit:
            self._monitor.pool_exhausted(
                stats,
                wait_seconds=waited,
                timed_out=False,
                stack=stack_here(),
                evidence=pool_evidence(pool, info),
                state=request,
            )

    def _timed_out(self, stats: PoolStats, pool: Pool, info: EngineInfo, start: int) -> None:
        stats.timed_out()
        self._monitor.pool_exhausted(
            stats,
            wait_seconds=(_perf_ns() - start) / 1e9,
            timed_out=True,
            stack=stack_here(),
            evidence=pool_evidence(pool, info),
            state=current_request(),
        )

    def _came_back(self, state: RecordState) -> None:
        """*state*'s connection is back in its pool, or left it (detached): close the books on
        its checkout, and report a leak if SQLAlchemy returned it because its connection object
        was garbage-collected."""
        checkout = state.checkout
        if checkout is None:
            return
        state.checkout = None
        checkout.returned = True
        now = _perf_ns()
        state.stats.checked_in(use_seconds=(now - checkout.start_ns) / 1e9, to_idle=state.open)
        ref = state.fairy_ref
        state.fairy_ref = None
        if ref is not None and ref() is None:
            self._monitor.connection_garbage_collected(checkout)

    # --- pool events -----------------------------------------------------------------------------
    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        try:
            state = record.info.get(self._key)
            if state is None:
                return
            self._came_back(state)
        except Exception as exc:
            self._dispatcher.report_error("source.sqlalchemy.pool", exc)

    def _on_close(self, dbapi_connection: Any, record: Any) -> None:
        try:
            state = record.info.get(self._key)
            if state is None or not state.open:
                return
            state.open = False
            if state.checkout is None:
                state.stats.idle_closed()
        except Exception as exc:
            self._dispatcher.report_error("source.sqlalchemy.pool", exc)

    def _on_detach(self, dbapi_connection: Any, record: Any) -> None:
        # The connection leaves the pool for good (Connection.detach(), or an asyncio
        # connection garbage-collected while checked out: SQLAlchemy detaches and terminates it).
        try:
            state = record.info.pop(self._key, None)
            if state is None:
                return
            state.open = False
            self._came_back(state)
        except Exception as exc:
            self._dispatcher.report_error("source.sqlalchemy.pool", exc)

    def connected(self, dbapi_connection: Any, elapsed_ns: int) -> None:
        """A dialect opened *dbapi_connection* in *elapsed_ns* (its pool's connect event
        follows, in the same thread, with the connection record)."""
        times = self._connect_times
        if len(times) >= _MAX_PENDING_CONNECTS:
            times.clear()
        times[id(dbapi_connection)] = (dbapi_connection, elapsed_ns)

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        try:
            known = self._connect_times.pop(id(dbapi_connection), None)
            if known is not None and known[0] is dbapi_connection:
                # Read by the checkout that asked for this connection, which knows the pool.
                record.info[self._created_key] = known[1]
        except Exception as exc:
            self._dispatcher.report_error("source.sqlalchemy.pool", exc)
