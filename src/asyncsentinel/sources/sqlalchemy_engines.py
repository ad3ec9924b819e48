"""SQLAlchemy engines: what asyncsentinel knows per engine (pool name, database system, driver
kind) and the statement shapes and duration recorders it keeps for each."""

from __future__ import annotations

import weakref

from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import Pool

from asyncsentinel.frames import Location
from asyncsentinel.sources.database_accounting import (
    MAX_NAME_CHARS,
    PoolStats,
    RecorderFactory,
    StatementShapes,
)

# db.system.name values of the semantic conventions, by SQLAlchemy dialect name.
_DB_SYSTEMS = {
    "postgresql": "postgresql",
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
}


class EngineInfo:
    """What asyncsentinel knows about one engine: pool name, database system, driver kind."""

    __slots__ = (
        "__weakref__",
        "created_at",
        "is_async",
        "name",
        "pool",
        "pool_stats",
        "statements",
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
        self.created_at: Location | None = None
        """The user-code line that created the engine, when seen."""
        self.pool: weakref.ref[Pool] | None = None
        """The pool :attr:`pool_stats` belongs to (an engine gets a new pool on ``dispose()``)."""
        self.pool_stats: PoolStats | None = None
        """Accounting of :attr:`pool`; ``None`` for pool types without pool metrics."""
        self.statements = StatementShapes(system, name, recorder, backslash=backslash)
        """Shapes and duration recorders of the statements run on this engine."""

    def rename(self, name: str) -> None:
        """Use *name* as the pool name from now on."""
        self.name = name
        self.statements.rename(name)


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
