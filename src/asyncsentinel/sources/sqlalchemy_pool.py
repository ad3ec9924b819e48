"""SQLAlchemy engines and pools: what asyncsentinel knows per engine, stacks across SQLAlchemy's
asyncio greenlets, and pool accounting (checkouts, waits, timeouts, leaked connections).

How pool accounting is wired (all of it removed again by :meth:`SQLAlchemySource.uninstall`):

* ``Engine.raw_connection`` — the one door through which every ``Connection`` (sync, or the
  sync side of an ``AsyncEngine``) gets a pooled connection — is wrapped at class level and calls
  :meth:`PoolTracker.checkout`. Only a wrapper can time the wait, count the callers waiting and
  see ``QueuePool limit ... reached``: the pool's ``checkout`` event fires after the wait and
  does not say which pool it belongs to.
* Class-level pool events (``checkin``, ``close``, ``detach``, ``connect``) and the dialect's
  ``do_connect`` event do the rest. They find the pool's bookkeeping in
  ``connection_record.info`` — the dictionary SQLAlchemy keeps per DBAPI connection for event
  handlers — under a key private to the tracker.

Pool types with a fixed set of connections per caller (``StaticPool``,
``SingletonThreadPool``, ``AssertionPool``, used with SQLite in memory) have no pool metrics:
they hand one connection to several callers, so "used" and "waiting" mean nothing there.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool, Pool, QueuePool

from asyncsentinel.context import current_request
from asyncsentinel.findings import Dispatcher, EvidenceValue
from asyncsentinel.frames import Location, is_user_code
from asyncsentinel.instruments import DB_OPERATION_DURATION, Instrument
from asyncsentinel.sources.database import (
    MAX_NAME_CHARS,
    Checkout,
    DatabaseMonitor,
    Origin,
    PoolStats,
    origin_location,
    origins_to_stack,
)
from asyncsentinel.sources.sql_shapes import describe

try:  # SQLAlchemy's asyncio support runs the sync engine in greenlets (sqlalchemy[asyncio]).
    from greenlet import getcurrent as _greenlet_current  # type: ignore[import-untyped,unused-ignore]
except ImportError:  # pragma: no cover - only sync engines are possible without it
    _greenlet_current = None

_perf_ns = time.perf_counter_ns
_STACK_LIMIT = 64
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

# db.system.name values of the semantic conventions, by SQLAlchemy dialect name.
_DB_SYSTEMS = {
    "postgresql": "postgresql",
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
}
_MAX_STATEMENTS_PER_ENGINE = 2048
_tracker_ids = itertools.count(1)


def _noop_weakref_callback(_ref: weakref.ref[Any]) -> None:
    """A weakref with a callback is cleared before finalizers run, even in reference cycles
    (SQLAlchemy's fairy finalizer relies on the same; cpython gh-135552)."""


Recorder = Callable[[float], None]
RecorderFactory = Callable[[Instrument, tuple[str, ...]], Recorder]


class EngineInfo:
    """What asyncsentinel knows about one engine: pool name, database system, driver kind."""

    __slots__ = (
        "__weakref__",
        "_bind",
        "_durations",
        "_statements",
        "backslash",
        "created_at",
        "is_async",
        "name",
        "pool",
        "pool_stats",
        "system",
    )

    def __init__(
        self,
        name: str,
        system: str,
        *,
        is_async: bool,
        backslash: bool,
        recorder: RecorderFactory,
    ) -> None:
        self.name = name
        self.system = system
        """``db.system.name`` as the semantic conventions spell it (``postgresql``, ``sqlite``)."""
        self.is_async = is_async
        """The driver is an asyncio driver (asyncpg, aiosqlite), run through greenlets."""
        self.backslash = backslash
        """String literals use backslash escapes (MySQL/MariaDB)."""
        self.created_at: Location | None = None
        """The user-code line that created the engine, when seen."""
        self.pool: weakref.ref[Pool] | None = None
        """The pool :attr:`pool_stats` belongs to (an engine gets a new pool on ``dispose()``)."""
        self.pool_stats: PoolStats | None = None
        """Accounting of :attr:`pool`; ``None`` for pool types without pool metrics."""
        self._bind = recorder
        self._statements: dict[str, tuple[str, Recorder]] = {}
        self._durations: dict[str, Recorder] = {}

    def statement(self, statement: str) -> tuple[str, Recorder]:
        """The shape of *statement* and the recorder of its
        ``db_client_operation_duration_seconds`` series (seconds).

        One dictionary lookup for statements seen before: SQLAlchemy's compiled cache hands
        the same strings over and over, and the recorder is bound once per operation name.
        Bounded; cleared when full.
        """
        known = self._statements.get(statement)
        if known is not None:
            return known
        shape, operation = describe(statement, backslash_escapes=self.backslash)
        record = self._durations.get(operation)
        if record is None:
            record = self._bind(DB_OPERATION_DURATION, (self.system, operation, self.name))
            if len(self._durations) >= _MAX_STATEMENTS_PER_ENGINE:
                self._durations.clear()
            self._durations[operation] = record
        known = (shape, record)
        if len(self._statements) >= _MAX_STATEMENTS_PER_ENGINE:
            self._statements.clear()
        self._statements[statement] = known
        return known

    def rename(self, name: str) -> None:
        """Use *name* as the pool name from now on."""
        self.name = name
        self._statements = {}
        self._durations = {}


# --- stacks across SQLAlchemy's greenlets -------------------------------------------------------
# greenlet type -> whether it is SQLAlchemy's asyncio greenlet (a class attribute marks it).
_provider_types: dict[type[Any], bool] = {}


def _outer(greenlet: Any) -> tuple[FrameType | None, Any]:
    """Where a stack continues after the outermost frame of *greenlet*'s stack (``None``: the
    current greenlet): an ``AsyncEngine`` runs the sync engine in a greenlet whose stack ends at
    SQLAlchemy's ``greenlet_spawn``; the user's coroutine is in the parent greenlet."""
    if greenlet is None:
        greenlet = _greenlet_current() if _greenlet_current is not None else None
        if greenlet is None:
            return None, None
    kind = type(greenlet)
    provider = _provider_types.get(kind)
    if provider is None:
        provider = bool(getattr(kind, "__sqlalchemy_greenlet_provider__", False))
        if len(_provider_types) < 64:
            _provider_types[kind] = provider
    parent = greenlet.parent if provider else None
    return (parent.gr_frame, parent) if parent is not None else (None, None)


def origins_here(skip: int = 0) -> list[Origin]:
    """The caller's stack as origins (code, offset), innermost first, continued across an
    asyncio greenlet; asyncsentinel's own frames at the inner end are left out.

    Reads only ``f_code``/``f_lasti``/``f_back`` per frame (no line numbers, no
    :class:`Location`): :func:`~.database.origins_to_stack` makes locations of it when a
    finding is reported.
    """
    out: list[Origin] = []
    append = out.append
    frame: FrameType | None = sys._getframe(1 + skip)
    greenlet = None
    inner_end = True
    left = _STACK_LIMIT
    while left:
        if frame is None:
            frame, greenlet = _outer(greenlet)
            if frame is None:
                break
        code = frame.f_code
        if inner_end:
            if code.co_filename.startswith(_OWN_DIR):
                frame = frame.f_back
                continue
            inner_end = False
        append((code, frame.f_lasti))
        frame = frame.f_back
        left -= 1
    return out


def stack_here() -> tuple[Location, ...]:
    """The caller's stack, outermost first, continued across an asyncio greenlet.

    asyncsentinel's own frames at the inner end are left out: the stack ends where the
    application or a library handed control to asyncsentinel.
    """
    return origins_to_stack(origins_here(skip=1))


def origin_here(skip: int = 0) -> Origin | None:
    """The innermost user-code frame of the caller's stack, as an :data:`Origin`: no line
    number, no :class:`Location`, no stack (see :func:`culprit_here`).

    *skip* more frames are known not to be user code (asyncsentinel's own callers).
    """
    try:
        frame: FrameType | None = sys._getframe(1 + skip)
    except ValueError:  # a shorter stack than the caller thought: walk all of it
        frame = sys._getframe(1)
    greenlet = None
    for _ in range(_STACK_LIMIT * 2):
        if frame is None:
            frame, greenlet = _outer(greenlet)
            if frame is None:
                return None
        code = frame.f_code
        if is_user_code(code.co_filename):
            return code, frame.f_lasti
        frame = frame.f_back
    return None


def culprit_here() -> Location | None:
    """The innermost user-code frame of the caller's stack (no full stack built)."""
    origin = origin_here()
    return origin_location(origin) if origin is not None else None


# --- engines ------------------------------------------------------------------------------------
def default_pool_name(url: URL) -> str:
    """The URL without user, password or query (a Unix-socket ``?host=`` is kept as host)."""
    host = url.host
    if not host:
        query_host = url.query.get("host")
        if isinstance(query_host, tuple):
            query_host = query_host[0] if query_host else None
        host = query_host or ""
    netloc = f"{host}:{url.port}" if url.port else host
    name = f"{url.drivername}://{netloc}"
    if url.database:
        name += f"/{url.database}"
    return name[:MAX_NAME_CHARS]


def engine_info(engine: Engine, recorder: RecorderFactory) -> EngineInfo:
    """A new :class:`EngineInfo` for *engine*, named after its URL; *recorder* binds its
    statement-duration series (:meth:`Dispatcher.recorder`)."""
    dialect = engine.dialect
    name = dialect.name
    return EngineInfo(
        default_pool_name(engine.url),
        _DB_SYSTEMS.get(name, name),
        is_async=bool(getattr(dialect, "is_async", False)),
        backslash=name in ("mysql", "mariadb"),
        recorder=recorder,
    )


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
        self._connect_started_key = f"asyncsentinel.{number}.connect_started"
        self._created_key = f"asyncsentinel.{number}.create_ns"
        self.listeners: tuple[tuple[type[Any], str, Callable[..., Any]], ...] = (
            (Pool, "checkin", self._on_checkin),
            (Pool, "close", self._on_close),
            (Pool, "detach", self._on_detach),
            (Pool, "connect", self._on_connect),
        )
        """(target, event, function) for ``event.listen`` / ``event.remove``."""
        self.engine_listeners: tuple[tuple[str, Callable[..., Any]], ...] = (
            ("do_connect", self._on_do_connect),
        )
        """Dialect events, listened to through the ``Engine`` class."""

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
            self._returned(state, end)
        from_idle = state is not None and state.open and state.stats is stats
        if not from_idle:
            state = record_info[self._key] = RecordState(stats)
        assert state is not None
        wait_ns = end - start
        stats.checked_out(from_idle=from_idle, wait_seconds=wait_ns / 1e9)
        request = current_request()
        checkout = Checkout(stats, end, request)
        state.checkout = checkout
        state.fairy_ref = weakref.ref(fairy, _noop_weakref_callback)
        if request is not None:
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

    def _returned(self, state: RecordState, now: int) -> Checkout | None:
        checkout = state.checkout
        if checkout is None:
            return None
        state.checkout = None
        checkout.returned = True
        state.stats.checked_in(use_seconds=(now - checkout.start_ns) / 1e9, to_idle=state.open)
        return checkout

    def _garbage_collected(self, state: RecordState) -> bool:
        ref = state.fairy_ref
        state.fairy_ref = None
        return ref is not None and ref() is None

    # --- pool events -----------------------------------------------------------------------------
    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        try:
            state = record.info.get(self._key)
            if state is None:
                return
            gc_collected = self._garbage_collected(state)
            checkout = self._returned(state, _perf_ns())
            if checkout is not None and gc_collected:
                self._monitor.connection_garbage_collected(checkout)
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
            gc_collected = self._garbage_collected(state)
            state.open = False
            checkout = self._returned(state, _perf_ns())
            if checkout is not None and gc_collected:
                self._monitor.connection_garbage_collected(checkout)
        except Exception as exc:
            self._dispatcher.report_error("source.sqlalchemy.pool", exc)

    def _on_do_connect(self, dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        try:
            if record is not None:
                record.info[self._connect_started_key] = _perf_ns()
        except Exception as exc:
            self._dispatcher.report_error("source.sqlalchemy.pool", exc)

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        try:
            info = record.info
            started = info.pop(self._connect_started_key, 0)
            if started:
                # Read by the checkout that asked for this connection, which knows the pool.
                info[self._created_key] = _perf_ns() - started
        except Exception as exc:
            self._dispatcher.report_error("source.sqlalchemy.pool", exc)
