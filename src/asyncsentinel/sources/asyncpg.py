"""asyncpg source: pool metrics and findings for asyncpg pools used directly (without SQLAlchemy).

``sentinel.instrument_asyncpg_pool(pool, name=...)`` registers a pool (SQLAlchemy's asyncpg
dialect is covered by the SQLAlchemy source). For it asyncsentinel records the
``db_client_connection_*`` metrics and reports ``pool_exhausted`` (an acquire that waited longer
than ``pool_wait_seconds`` or hit its ``timeout=``), ``connection_leaked`` (acquired during a
request, still out ``connection_leak_seconds`` after it) and ``pool_not_disposed`` (not closed
at shutdown).

``asyncpg.Pool`` has ``__slots__`` and no hooks, so three of its methods are wrapped at class
level (``functools.wraps``; originals restored on uninstall; pools nobody registered pass straight
through): ``release`` (public) and the private ``_acquire`` and ``_get_new_connection``, which
every acquire path (``acquire()``, ``fetch()``, ``execute()``...) and every new connection go
through. Used/idle levels come from the public ``get_size()``/``get_idle_size()``, so they are
exact. Whether a connection was taken back without ``release()`` (closed instead) is read from
the pool proxy's private ``_con``.

Statements: the query methods of the connection proxy a pool hands out (``PoolConnectionProxy``:
``execute``, ``executemany``, ``fetch``, ``fetchrow``, ``fetchval``, ``fetchmany``, which
``pool.fetch()`` and the like call too) are wrapped the same way, so statements run through a
registered pool get ``db_client_operation_duration_seconds``, count into the request's
statements (``asyncsentinel_request_db_queries``, N+1) and can be ``slow_query`` findings, with
the line that ran them. asyncpg's own query loggers are not used: they are called on a later
loop iteration, when the stack that ran the statement is gone. Not seen: prepared statements
(``conn.prepare()``), cursors and ``COPY``; SQLAlchemy's asyncpg dialect does not use pools or
these methods (the SQLAlchemy source covers it).
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from asyncpg.pool import Pool, PoolConnectionProxy

from asyncsentinel.config import Settings
from asyncsentinel.context import current_request
from asyncsentinel.findings import POOL_NOT_DISPOSED, Dispatcher, EvidenceValue, Finding
from asyncsentinel.frames import (
    PACKAGE_PREFIX,
    Location,
    Origin,
    origins_to_stack,
    user_origin,
)
from asyncsentinel.sources import Source
from asyncsentinel.sources._shared_wrappers import SharedWrappers
from asyncsentinel.sources.database import DatabaseMonitor
from asyncsentinel.sources.database_accounting import (
    MAX_NAME_CHARS,
    Checkout,
    PoolStats,
    StatementShapes,
)

_perf_ns = time.perf_counter_ns
_STACK_LIMIT = 64


class _PoolEntry:
    """A registered pool, its stats and its connections out (by id of the pool proxy)."""

    __slots__ = ("acquiring", "out", "pool", "statements", "stats")

    def __init__(self, pool: Pool, stats: PoolStats, statements: StatementShapes) -> None:
        self.pool = pool
        self.stats = stats
        self.statements = statements
        self.out: dict[int, Checkout] = {}
        self.acquiring: dict[asyncio.Task[Any] | None, int] = {}
        """Tasks inside an acquire -> nanoseconds they spent opening new connections."""


def default_pool_name(pool: Pool) -> str:
    """``postgresql://host:port/database`` from the pool's connect arguments, no credentials."""
    args = getattr(pool, "_connect_args", None) or ()
    kwargs = getattr(pool, "_connect_kwargs", None) or {}
    dsn = args[0] if args and isinstance(args[0], str) else kwargs.get("dsn")
    host, port, database = kwargs.get("host"), kwargs.get("port"), kwargs.get("database")
    if isinstance(dsn, str) and "://" in dsn:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = host or parts.hostname or _first(query.get("host"))
        port = port or parts.port or _first(query.get("port"))
        database = database or parts.path.lstrip("/") or _first(query.get("dbname"))
    if isinstance(host, list | tuple):
        host = host[0] if host else None
    netloc = f"{host or ''}:{port}" if port else str(host or "")
    name = f"postgresql://{netloc}" + (f"/{database}" if database else "")
    return name[:MAX_NAME_CHARS]


def _first(values: list[str] | None) -> str | None:
    return values[0] if values else None


def _origins_here() -> list[Origin]:
    """The caller's stack as origins, innermost first, without asyncsentinel's own frames at the
    inner end (lines are computed only if a finding is reported)."""
    out: list[Origin] = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and len(out) < _STACK_LIMIT:
        code = frame.f_code
        if out or not code.co_filename.startswith(PACKAGE_PREFIX):
            out.append((code, frame.f_lasti))
        frame = frame.f_back
    return out


def _stack_here() -> tuple[Location, ...]:
    """The caller's stack without asyncsentinel's own frames at the inner end."""
    return origins_to_stack(_origins_here())


def _entry(pool: Pool | None) -> tuple[AsyncpgSource, _PoolEntry] | None:
    for source in _ACTIVE:
        entry = source.entries.get(id(pool))
        if entry is not None and entry.pool is pool:
            return source, entry
    return None


def _wrap_acquire(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def _acquire(self: Pool, timeout: float | None) -> Any:
        found = _entry(self)
        if found is None:
            return await original(self, timeout)
        source, entry = found
        return await source.acquire(entry, functools.partial(original, self, timeout))

    return _acquire


def _wrap_release(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def release(self: Pool, connection: Any, *, timeout: float | None = None) -> Any:
        found = _entry(self)
        if found is None:
            return await original(self, connection, timeout=timeout)
        # Account before the original: it hands the connection to the next waiter, which runs
        # before this coroutine resumes.
        found[0].releasing(found[1], connection)
        try:
            return await original(self, connection, timeout=timeout)
        finally:
            found[0].released(found[1])

    return release


def _wrap_new_connection(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def _get_new_connection(self: Pool) -> Any:
        found = _entry(self)
        start = _perf_ns()
        connection = await original(self)
        if found is not None:
            found[0].connection_created(found[1], (_perf_ns() - start) / 1e9)
        return connection

    return _get_new_connection


# Three ``Pool`` methods, wrapped once for all installed sources.
_POOL_WRAPPERS: SharedWrappers[AsyncpgSource] = SharedWrappers(
    Pool,
    {
        "_acquire": _wrap_acquire,
        "release": _wrap_release,
        "_get_new_connection": _wrap_new_connection,
    },
)
_ACTIVE = _POOL_WRAPPERS.active  # a module global: read on every acquire and release


def _query_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The statement text of a proxy query method's arguments (``query``, or ``command`` for
    ``executemany``)."""
    if args:
        return args[0]
    return kwargs.get("query", kwargs.get("command"))


def _wrap_query(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def query_method(self: PoolConnectionProxy, *args: Any, **kwargs: Any) -> Any:
        # The pool behind the proxy, read from asyncpg's private holder: looked up defensively,
        # so another asyncpg layout only means the statement is not observed.
        holder = getattr(self, "_holder", None)
        found = _entry(getattr(holder, "_pool", None)) if _ACTIVE else None
        if found is None:
            return await original(self, *args, **kwargs)
        start = _perf_ns()
        result = await original(self, *args, **kwargs)
        found[0].executed(found[1], _query_of(args, kwargs), _perf_ns() - start)
        return result

    return query_method


# The statement methods of the connections pools hand out, wrapped for the same sources.
_QUERY_METHODS = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "fetchmany")
_PROXY_WRAPPERS: SharedWrappers[AsyncpgSource] = SharedWrappers(
    PoolConnectionProxy,
    {name: _wrap_query for name in _QUERY_METHODS if name in PoolConnectionProxy.__dict__},
)


class AsyncpgSource(Source):
    """Observes registered ``asyncpg.Pool`` objects: checkouts, waits, timeouts and leaks.

    Per-request work (leak checks of connections acquired during a request) is completed by the
    SQLAlchemy source's ``request_finished``, which the same setting switches on.
    """

    name = "asyncpg"

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        super().__init__(settings, dispatcher)
        self.monitor = DatabaseMonitor.shared(settings, dispatcher)
        self.entries: dict[int, _PoolEntry] = {}
        self._wait_limit = settings.pool_wait_seconds
        self._n_plus_one = settings.n_plus_one_threshold
        self._slow_ns = int(settings.slow_query_seconds * 1e9)

    def install(self) -> None:
        _POOL_WRAPPERS.join(self)
        _PROXY_WRAPPERS.join(self)

    def uninstall(self) -> None:
        _PROXY_WRAPPERS.leave(self)
        if _POOL_WRAPPERS.leave(self):
            self.monitor.cancel_leak_checks()
            self.entries.clear()

    def instrument_pool(self, pool: Any, name: str | None = None) -> str:
        """Observe an ``asyncpg.Pool``; returns its name (default: its DSN without credentials)."""
        if not isinstance(pool, Pool):
            raise TypeError(
                f"instrument_pool() needs an asyncpg.Pool, got {type(pool).__qualname__}"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"instrument_pool(name=...) must be a non-empty str: {name!r}")
        # Forget pools that were closed (their ids may be reused by new pools).
        for key, entry in list(self.entries.items()):
            if entry.pool.is_closing():
                del self.entries[key]
        known = self.entries.get(id(pool))
        if known is not None and known.pool is pool:
            if name is not None:
                known.stats.rename(name[:MAX_NAME_CHARS])
                known.statements.rename(name[:MAX_NAME_CHARS])
            return known.stats.name
        pool_name = (name or default_pool_name(pool))[:MAX_NAME_CHARS]
        entry = _PoolEntry(
            pool,
            PoolStats(self.dispatcher, pool_name, pool.get_max_size()),
            StatementShapes("postgresql", pool_name, self.dispatcher.recorder),
        )
        self.entries[id(pool)] = entry
        self._levels(entry)
        return pool_name

    @staticmethod
    def _levels(entry: _PoolEntry) -> None:
        pool = entry.pool
        idle = pool.get_idle_size()
        entry.stats.set_levels(pool.get_size() - idle, idle)

    # --- called by the Pool wrappers ------------------------------------------------------------
    async def acquire(self, entry: _PoolEntry, original: Callable[[], Awaitable[Any]]) -> Any:
        """Run the pool's ``_acquire`` (*original*), timing and accounting it."""
        stats = entry.stats
        task = asyncio.current_task()
        entry.acquiring[task] = 0
        stats.wait_started()
        start = _perf_ns()
        try:
            proxy = await original()
        except TimeoutError:  # acquire(timeout=...) ran out (asyncio.TimeoutError is TimeoutError)
            try:
                stats.timed_out()
                self._exhausted(entry, (_perf_ns() - start) / 1e9, timed_out=True)
            except Exception as exc:
                self.dispatcher.report_error("source.asyncpg", exc)
            raise
        finally:
            stats.wait_ended()
            opening_ns = entry.acquiring.pop(task, 0)
        try:
            self._acquired(entry, proxy, start, opening_ns)
        except Exception as exc:
            self.dispatcher.report_error("source.asyncpg", exc)
        return proxy

    def _acquired(self, entry: _PoolEntry, proxy: Any, start: int, opening_ns: int) -> None:
        end = _perf_ns()
        stats = entry.stats
        stats.wait_observed((end - start) / 1e9)
        self._levels(entry)
        out = entry.out
        for key, earlier in list(out.items()):
            if not earlier.is_out():  # taken back without release() (closed): forget it
                del out[key]
        request = current_request()
        checkout = Checkout(
            stats, end, request, still_out=lambda: getattr(proxy, "_con", None) is not None
        )
        out[id(proxy)] = checkout
        if request is not None:
            db = self.monitor.request(request)
            if db is not None and db.remember_checkout(checkout):
                # The line is computed only if this connection is reported as leaked.
                checkout.origin = user_origin(sys._getframe())
        # Opening a connection is not waiting for the pool: judge the wait without it.
        waited = (end - start - opening_ns) / 1e9
        if waited > self._wait_limit:
            self._exhausted(entry, waited, timed_out=False)

    def _exhausted(self, entry: _PoolEntry, waited: float, *, timed_out: bool) -> None:
        pool = entry.pool
        self.monitor.pool_exhausted(
            entry.stats,
            wait_seconds=waited,
            timed_out=timed_out,
            stack=_stack_here(),
            evidence={
                "db_system_name": "postgresql",
                "pool_size": pool.get_max_size(),
                "min_size": pool.get_min_size(),
            },
            state=current_request(),
        )

    # --- called by the connection proxy wrappers ------------------------------------------------
    def executed(self, entry: _PoolEntry, query: Any, elapsed_ns: int) -> None:
        """A statement ran through a connection of *entry*'s pool in *elapsed_ns*."""
        try:
            if not isinstance(query, str):
                return
            shape, record_duration = entry.statements.shape_of(query)
            record_duration(elapsed_ns / 1e9)
            request = current_request()
            if request is not None:
                monitor = self.monitor
                db = monitor.request(request)
                if db is not None and db.add(shape, elapsed_ns) == self._n_plus_one:
                    where = user_origin(sys._getframe(1))
                    evidence = self._evidence(entry)
                    monitor.flag_n_plus_one(request, db, shape, where, _origins_here, evidence)
            if elapsed_ns >= self._slow_ns:
                self.monitor.slow_query(
                    shape, elapsed_ns / 1e9, _stack_here(), self._evidence(entry)
                )
        except Exception as exc:
            self.dispatcher.report_error("source.asyncpg", exc)

    @staticmethod
    def _evidence(entry: _PoolEntry) -> dict[str, EvidenceValue]:
        return {"pool": entry.stats.name, "db_system_name": "postgresql"}

    def releasing(self, entry: _PoolEntry, connection: Any) -> None:
        """``Pool.release`` was called: the checkout ends."""
        try:
            checkout = entry.out.pop(id(connection), None)
            if checkout is not None:
                checkout.returned = True
                entry.stats.use_observed((_perf_ns() - checkout.start_ns) / 1e9)
        except Exception as exc:
            self.dispatcher.report_error("source.asyncpg", exc)

    def released(self, entry: _PoolEntry) -> None:
        """``Pool.release`` returned: the pool's levels changed."""
        try:
            self._levels(entry)
        except Exception as exc:
            self.dispatcher.report_error("source.asyncpg", exc)

    def connection_created(self, entry: _PoolEntry, seconds: float) -> None:
        """After ``Pool._get_new_connection``."""
        try:
            entry.stats.created(seconds)
            task = asyncio.current_task()
            if task in entry.acquiring:
                entry.acquiring[task] += int(seconds * 1e9)
        except Exception as exc:
            self.dispatcher.report_error("source.asyncpg", exc)

    async def stop(self) -> None:
        """At shutdown: report registered pools that were never closed."""
        self.monitor.cancel_leak_checks()
        for entry in list(self.entries.values()):
            pool = entry.pool
            if pool.is_closing():
                continue
            size = pool.get_size()
            if size <= 0:
                continue
            self.dispatcher.emit(
                Finding.create(
                    POOL_NOT_DISPOSED,
                    f"at shutdown the asyncpg pool {entry.stats.name!r} still holds {size} "
                    f"connection(s): it was never closed; call `await pool.close()` in the "
                    f"application's lifespan shutdown",
                    evidence={
                        "pool": entry.stats.name,
                        "db_system_name": "postgresql",
                        "idle": pool.get_idle_size(),
                        "used": size - pool.get_idle_size(),
                    },
                    request=None,
                )
            )
