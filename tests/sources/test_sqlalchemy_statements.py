"""How statements are observed: through the dialect's ``do_execute*`` events, on every execution
path (single, executemany, no parameters, insertmanyvalues), without disturbing the
application's own ``do_execute`` listeners, and without ever running a statement twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.ext.asyncio import create_async_engine

from tests.support import sample

_metadata = MetaData()
_items = Table(
    "items",
    _metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(50), nullable=False),
)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'statements.db'}")
    with engine.begin() as conn:
        _metadata.create_all(conn)
    yield engine
    engine.dispose()


def _statements(registry: Any, operation: str | None = None) -> float:
    """Statements recorded in db_client_operation_duration_seconds (of one operation)."""
    return sum(
        s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "db_client_operation_duration_seconds_count"
        and operation in (None, s.labels["db_operation_name"])
    )


def test_every_execution_path_is_counted_once(engine: Engine, make_sentinel, registry) -> None:
    make_sentinel()
    with engine.begin() as conn:
        conn.execute(insert(_items), [{"name": f"n{i}"} for i in range(5)])  # executemany
        conn.execute(insert(_items).values(name="one"))  # one set of parameters
        conn.exec_driver_sql("DELETE FROM items WHERE name = 'n0'")  # no parameters at all
        returned = conn.execute(  # insertmanyvalues: one INSERT ... RETURNING per batch
            insert(_items).returning(_items.c.id), [{"name": f"r{i}"} for i in range(3)]
        ).all()
        rows = conn.execute(select(_items.c.name)).all()
    assert len(returned) == 3
    assert len(rows) == 5 + 1 - 1 + 3  # each statement ran exactly once
    assert _statements(registry, "INSERT") == 3
    assert _statements(registry, "DELETE") == 1
    assert _statements(registry, "SELECT") == 1


async def test_sqlalchemys_own_first_connect_statements_are_not_counted(
    pg_url: str, make_sentinel, registry
) -> None:
    make_sentinel()
    # A new engine: on its first connection the PostgreSQL dialect queries the server version,
    # schema and string escaping, which SQLAlchemy keeps out of connection events. The
    # application ran one statement.
    fresh = create_async_engine(pg_url)
    try:
        async with fresh.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await fresh.dispose()
    assert _statements(registry) == 1


def test_do_execute_listeners_of_the_application_still_run_in_order(
    engine: Engine, make_sentinel, registry
) -> None:
    calls: list[str] = []

    def before_us(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        calls.append("registered before asyncsentinel")
        return False

    def after_us(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        calls.append("registered after asyncsentinel")
        return False

    event.listen(engine, "do_execute", before_us)
    try:
        make_sentinel()
        event.listen(engine, "do_execute", after_us)
        with engine.connect() as conn:
            assert conn.execute(select(_items.c.id)).all() == []
    finally:
        for listener in (before_us, after_us):
            if event.contains(engine, "do_execute", listener):
                event.remove(engine, "do_execute", listener)
    assert calls == ["registered before asyncsentinel", "registered after asyncsentinel"]
    assert _statements(registry, "SELECT") == 1


def test_a_listener_that_executes_the_statement_itself_is_respected(
    engine: Engine, make_sentinel, registry
) -> None:
    """A do_execute listener returning True has executed the statement: nobody runs it again."""
    make_sentinel()
    executed_by_listener: list[str] = []

    def execute_itself(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        cursor.execute(statement, parameters)
        executed_by_listener.append(statement)
        return True

    event.listen(engine, "do_execute", execute_itself)
    try:
        with engine.begin() as conn:
            conn.execute(insert(_items).values(name="once"))
    finally:
        event.remove(engine, "do_execute", execute_itself)
    with engine.connect() as conn:
        assert conn.execute(select(_items.c.name)).scalars().all() == ["once"]
    assert len(executed_by_listener) == 1
    assert _statements(registry, "INSERT") == 1  # still observed, and timed


def test_a_failing_statement_propagates_unchanged_and_is_not_counted(
    engine: Engine, make_sentinel, registry
) -> None:
    make_sentinel()
    with engine.connect() as conn, pytest.raises(Exception, match="no such table"):
        conn.execute(text("SELECT * FROM missing_table"))
    assert _statements(registry, "SELECT") == 0
    errors = "asyncsentinel_instrumentation_errors_total"
    assert sample(registry, errors, component="source.sqlalchemy") == 0
