"""SQLAlchemy engines: what asyncsentinel knows per engine (pool name, database system, driver
kind) and the statement shapes and duration recorders it keeps for each."""

from __future__ import annotations

import weakref
from collections.abc import Callable

from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import Pool

from asyncsentinel.frames import Location
from asyncsentinel.instruments import DB_OPERATION_DURATION, Instrument
from asyncsentinel.sources.database_accounting import MAX_NAME_CHARS, PoolStats
from asyncsentinel.sources.sql_shapes import describe

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
