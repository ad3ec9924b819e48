"""SQLAlchemy source: statements, pools and engine life cycle of every engine in the process.

Zero configuration: listeners are registered on the ``Engine`` and ``Pool`` *classes*, so every
engine is observed — ``AsyncEngine`` (through its ``sync_engine``) and engines created later
included. Statements are timed by wrappers of the dialect's ``do_execute``/``do_executemany``/
``do_execute_no_params`` methods (:mod:`.sqlalchemy_dialects`), not by SQLAlchemy's events:
a single connection-event listener makes SQLAlchemy route every connection through its event
machinery, which alone costs more than all of asyncsentinel's per-statement work, and the
listener of the dialect's ``do_execute*`` events (which also had to run the listeners registered
after it) cost ~1 µs more per statement than the wrappers, measured side by side
(``benchmarks/README.md``). :meth:`SQLAlchemySource.instrument_engine` only
names a pool; the default name is the URL without credentials
(``postgresql+asyncpg://127.0.0.1:5432/shop``).

Signals: ``db_client_operation_duration_seconds`` per statement; per request the statement count
and time (``asyncsentinel_request_db_queries``, span attributes ``asyncsentinel.db.*``); pool
metrics (see :mod:`.sqlalchemy_pool`). Findings: ``n_plus_one``, ``slow_query``,
``pool_exhausted``, ``sync_db_on_event_loop``, ``engine_created_in_request``,
``connection_leaked``, ``pool_not_disposed`` and ``pool_pre_ping`` advice.

Two methods of ``Engine`` are also wrapped (``functools.wraps``, originals restored on uninstall):
``__init__`` to see engines being created (SQLAlchemy has no event for it) and
``raw_connection`` to time checkouts. Private names relied on, identical in SQLAlchemy 2.0 and
2.1: ``OptionEngine._proxied`` (an ``engine.execution_options()`` copy's engine), a
``Connection``'s own ``_has_events=False`` (SQLAlchemy's internal first-connect queries),
``QueuePool._max_overflow`` and ``Pool._pre_ping`` (no public accessors), and the
``__sqlalchemy_greenlet_provider__`` marker of SQLAlchemy's asyncio greenlets.

Nothing derived from parameters is ever recorded: statements are reduced to their shape
(:mod:`.sql_shapes`) and bind parameters are never read.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from asyncsentinel.config import Settings
from asyncsentinel.context import RequestState, current_request, current_request_var
from asyncsentinel.findings import (
    DB_CONFIGURATION_ADVICE,
    ENGINE_CREATED_IN_REQUEST,
    POOL_NOT_DISPOSED,
    SYNC_DB_ON_EVENT_LOOP,
    Dispatcher,
    EvidenceValue,
    Finding,
    Severity,
)
from asyncsentinel.frames import Location, user_culprit
from asyncsentinel.sources import Source, sqlalchemy_dialects
from asyncsentinel.sources._shared_wrappers import SharedWrappers
from asyncsentinel.sources.database import DatabaseMonitor
from asyncsentinel.sources.database_accounting import (
    MAX_NAME_CHARS,
    MAX_SHAPES_PER_REQUEST,
    RequestDb,
)
from asyncsentinel.sources.sqlalchemy_engines import EngineInfo, engine_info
from asyncsentinel.sources.sqlalchemy_pool import PoolTracker
from asyncsentinel.sources.sqlalchemy_stacks import (
    culprit_here,
    origin_here,
    origins_here,
    stack_here,
)

_running_loop = asyncio._get_running_loop
_MAX_REMEMBERED = 1000  # advice and out-of-request sync findings already reported (bounded)


def _wrap_init(original_init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original_init)
    def __init__(self: Engine, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        for source in tuple(_ACTIVE):
            source.engine_created(self)

    return __init__


def _wrap_raw_connection(original_raw_connection: Callable[[Engine], Any]) -> Callable[..., Any]:
    @functools.wraps(original_raw_connection)
    def raw_connection(self: Engine) -> Any:
        active = _ACTIVE
        if not active:
            return original_raw_connection(self)
        if len(active) == 1:
            return active[0].checkout(self, original_raw_connection)
        call: Callable[[Engine], Any] = original_raw_connection
        for source in active:
            call = functools.partial(_checkout_via, source, call)
        return call(self)

    return raw_connection


# ``Engine.__init__`` and ``Engine.raw_connection``, wrapped once for all installed sources.
_ENGINE_WRAPPERS: SharedWrappers[SQLAlchemySource] = SharedWrappers(
    Engine, {"__init__": _wrap_init, "raw_connection": _wrap_raw_connection}
)
_ACTIVE = _ENGINE_WRAPPERS.active  # a module global: read by raw_connection on every checkout
_ORIGINALS = _ENGINE_WRAPPERS.originals  # benchmarks/db_overhead.py restores them to time parts


def _checkout_via(source: SQLAlchemySource, inner: Callable[[Engine], Any], engine: Engine) -> Any:
    return source.checkout(engine, inner)


class SQLAlchemySource(Source):
    """Observes every SQLAlchemy engine: statements, pools, and the mistakes around them."""

    name = "sqlalchemy"

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        super().__init__(settings, dispatcher)
        self.monitor = DatabaseMonitor.shared(settings, dispatcher)
        self.pools = PoolTracker(self.monitor, dispatcher)
        self._engines: dict[int, EngineInfo] = {}
        self._engine_refs: dict[int, weakref.ref[Engine]] = {}
        self._advised: set[str] = set()
        self._sync_reported: set[str] = set()
        self._n_plus_one = settings.n_plus_one_threshold
        self._slow_ns = int(settings.slow_query_seconds * 1e9)
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = list(self.pools.listeners)
        self._installed = False

    # --- life cycle ------------------------------------------------------------------------------
    def install(self) -> None:
        if self._installed:
            return
        for target, identifier, fn in self._listeners:
            event.listen(target, identifier, fn)
        _ENGINE_WRAPPERS.join(self)
        sqlalchemy_dialects.join(self)
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        self._installed = False
        sqlalchemy_dialects.leave(self)
        _ENGINE_WRAPPERS.leave(self)
        for target, identifier, fn in self._listeners:
            if event.contains(target, identifier, fn):
                event.remove(target, identifier, fn)
        self.monitor.cancel_leak_checks()
        self._engines.clear()
        self._engine_refs.clear()

    async def stop(self) -> None:
        """At shutdown: report engines whose pool still holds connections (never disposed)."""
        self.monitor.cancel_leak_checks()
        for key, ref in list(self._engine_refs.items()):
            engine = ref()
            info = self._engines.get(key)
            if engine is None or info is None:
                continue
            pool = engine.pool
            if not isinstance(pool, QueuePool):
                continue
            idle = pool.checkedin()
            if idle <= 0:
                continue  # disposed (or never connected): nothing is held
            self.dispatcher.emit(
                Finding.create(
                    POOL_NOT_DISPOSED,
                    f"at shutdown the engine of pool {info.name!r} still holds {idle} pooled "
                    f"connection(s): it was never disposed; call `await engine.dispose()` "
                    f"(or engine.dispose()) in the application's lifespan shutdown",
                    culprit=info.created_at,
                    evidence={
                        "pool": info.name,
                        "db_system_name": info.system,
                        "idle": idle,
                        "used": pool.checkedout(),
                    },
                    request=None,
                )
            )

    def request_finished(self, state: RequestState) -> None:
        self.monitor.finish_request(state)

    # --- engines ---------------------------------------------------------------------------------
    def instrument_engine(self, engine: Any, *, name: str | None = None) -> str:
        """Name the pool of an ``Engine`` or ``AsyncEngine``; returns the pool name.

        Every engine is observed without this; it only chooses the pool name label.
        """
        sync_engine = getattr(engine, "sync_engine", engine)
        if not isinstance(sync_engine, Engine):
            raise TypeError(
                f"instrument_engine() needs a SQLAlchemy Engine or AsyncEngine, "
                f"got {type(engine).__qualname__}"
            )
        info = self._info(sync_engine)
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"instrument_engine(name=...) must be a non-empty str: {name!r}")
            name = name[:MAX_NAME_CHARS]
            if name != info.name:
                info.rename(name)
                self.pools.rename(sync_engine.pool, name)
        return info.name

    def _info(self, engine: Engine) -> EngineInfo:
        info = self._engines.get(id(engine))
        if info is not None:
            return info
        # An engine.execution_options() copy shares its engine's pool: use that engine's info.
        proxied = getattr(engine, "_proxied", None)
        while isinstance(proxied, Engine):
            engine = proxied
            proxied = getattr(engine, "_proxied", None)
        return self._engines.get(id(engine)) or self._register(engine, None)

    def _register(self, engine: Engine, created_at: Location | None) -> EngineInfo:
        key = id(engine)
        info = engine_info(engine, self.dispatcher.recorder)
        info.created_at = created_at
        engines, refs = self._engines, self._engine_refs

        def forget(_ref: weakref.ref[Engine]) -> None:
            engines.pop(key, None)
            refs.pop(key, None)

        refs[key] = weakref.ref(engine, forget)
        engines[key] = info
        sqlalchemy_dialects.cover(type(engine.dialect))
        self._advise(engine, info)
        return info

    def engine_created(self, engine: Engine) -> None:
        """Called by the ``Engine.__init__`` wrapper for every new engine."""
        try:
            request = current_request()
            stack = stack_here() if request is not None else ()
            culprit = user_culprit(stack) if request is not None else culprit_here()
            info = self._register(engine, culprit)
            if request is None:
                return
            self.dispatcher.emit(
                Finding.create(
                    ENGINE_CREATED_IN_REQUEST,
                    f"an engine (pool {info.name!r}) was created while handling a request: every "
                    f"request pays for new connections and the pools pile up; create one engine "
                    f"at start-up and share it",
                    culprit=culprit,
                    stack=stack,
                    evidence={"pool": info.name, "db_system_name": info.system},
                    request=request,
                )
            )
        except Exception as exc:
            self.dispatcher.report_error("source.sqlalchemy", exc)

    def _advise(self, engine: Engine, info: EngineInfo) -> None:
        pool = engine.pool
        # Pre-ping matters for network databases: SQLite files cannot drop a connection.
        if not isinstance(pool, QueuePool) or info.system == "sqlite":
            return
        if getattr(pool, "_pre_ping", True) or info.name in self._advised:
            return
        if len(self._advised) >= _MAX_REMEMBERED:
            return
        self._advised.add(info.name)
        self.dispatcher.emit(
            Finding.create(
                DB_CONFIGURATION_ADVICE,
                f"pool {info.name!r} has pool_pre_ping off: a connection the server, a proxy or a "
                f"firewall closed while idle fails the first request that gets it; pass "
                f"pool_pre_ping=True to create_engine()/create_async_engine()",
                severity=Severity.INFO,
                culprit=info.created_at,
                evidence={"pool": info.name, "setting": "pool_pre_ping", "value": False},
                request=None,
            )
        )

    def checkout(self, engine: Engine, original: Callable[[Engine], Any]) -> Any:
        """Called by the ``Engine.raw_connection`` wrapper: an accounted checkout."""
        try:
            info = self._engines.get(id(engine)) or self._info(engine)
        except Exception as exc:
            self.dispatcher.report_error("source.sqlalchemy", exc)
            return original(engine)
        return self.pools.checkout(engine, original, info)

    # --- statements (the hot path: keep it short) ------------------------------------------------
    def connected(self, connection: Any, elapsed_ns: int) -> None:
        """A dialect opened a DBAPI connection (called by :mod:`.sqlalchemy_dialects`)."""
        try:
            self.pools.connected(connection, elapsed_ns)
        except Exception as exc:
            self.dispatcher.report_error("source.sqlalchemy.pool", exc)

    def executed(self, context: Any, statement: str, elapsed: int) -> None:
        """Account one statement that ran successfully in *elapsed* nanoseconds (called by the
        dialect wrappers of :mod:`.sqlalchemy_dialects`)."""
        try:
            connection = context.root_connection
            if connection.__dict__.get("_has_events") is False:
                # SQLAlchemy's own statements (the dialect initialising itself on an engine's
                # first connection) run on a Connection created with _has_events=False, which
                # SQLAlchemy keeps out of connection events: not the application's either.
                return
            engine = connection.engine
            info = self._engines.get(id(engine)) or self._info(engine)
            # Calls saved on purpose here (this runs for every statement): the shape cache and
            # the request context variable are read directly.
            statements = info.statements
            known = statements.known.get(statement)
            shape, record_duration = known or statements.shape_of(statement)
            record_duration(elapsed / 1e9)
            request = current_request_var.get()
            if request is not None:
                monitor = self.monitor
                db = request.db
                if db is None or db.owner is not monitor:
                    db = monitor.request(request)
                # RequestDb.add, written out (a call less per statement).
                if db is not None:
                    db.count += 1
                    db.duration_ns += elapsed
                    shapes = db.shapes
                    seen = shapes.get(shape, 0) + 1
                    if seen > 1 or len(shapes) < MAX_SHAPES_PER_REQUEST:
                        shapes[shape] = seen
                        if seen == self._n_plus_one:
                            self._flag_n_plus_one(request, db, shape, info)
            if elapsed >= self._slow_ns:
                self.monitor.slow_query(shape, elapsed / 1e9, stack_here(), self._evidence(info))
            if not info.is_async and _running_loop() is not None:
                self._sync_on_loop(context, info, shape, elapsed, request)
        except Exception as exc:
            self.dispatcher.report_error("source.sqlalchemy", exc)

    def _flag_n_plus_one(
        self, request: RequestState, db: RequestDb, shape: str, info: EngineInfo
    ) -> None:
        where = origin_here(skip=2)  # the innermost user frame: this, executed(), the wrapper
        self.monitor.flag_n_plus_one(request, db, shape, where, origins_here, self._evidence(info))

    @staticmethod
    def _evidence(info: EngineInfo) -> dict[str, EvidenceValue]:
        return {"pool": info.name, "db_system_name": info.system}

    def _sync_on_loop(
        self,
        context: Any,
        info: EngineInfo,
        shape: str,
        elapsed_ns: int,
        request: RequestState | None,
    ) -> None:
        # An AsyncEngine's statements also run on the loop thread, but in a greenlet that awaits
        # the async driver: info.is_async tells them apart. Report once per request (or once per
        # statement shape outside requests), with the stack of the first offence.
        if request is not None:
            db = request.db
            if isinstance(db, RequestDb) and not db.first_time(SYNC_DB_ON_EVENT_LOOP):
                return
        else:
            key = f"{info.name}|{shape}"
            if key in self._sync_reported or len(self._sync_reported) >= _MAX_REMEMBERED:
                return
            self._sync_reported.add(key)
        stack = stack_here()
        driver = str(getattr(context.dialect, "driver", info.system))
        self.dispatcher.emit(
            Finding.create(
                SYNC_DB_ON_EVENT_LOOP,
                f"a synchronous database driver ({driver}) ran a statement on the event loop's "
                f"thread, blocking every other request for {elapsed_ns / 1e6:.1f} ms; use an "
                f"async engine (create_async_engine) or run it in asyncio.to_thread()",
                culprit=user_culprit(stack),
                stack=stack,
                evidence={
                    **self._evidence(info),
                    "driver": driver,
                    "statement": shape,
                    "duration_seconds": round(elapsed_ns / 1e9, 6),
                },
                request=request,
            )
        )
