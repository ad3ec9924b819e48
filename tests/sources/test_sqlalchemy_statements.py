"""How statements are observed: through the dialect's ``do_execute*`` methods, wrapped, on every
execution path (single, executemany, no parameters, insertmanyvalues), in dialects that override
them, without disturbing the application's own ``do_execute`` listeners, and without ever
running a statement twice."""

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
from sqlalchemy.dialects import registry as dialects
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
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
    """A do_execute listener returning True has executed the statement: nobody runs it again.

    SQLAlchemy then never calls the dialect's method, so asyncsentinel does not see that
    statement (the documented limit of timing the dialect's methods rather than its events)."""
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
    assert _statements(registry, "INSERT") == 0
    assert _statements(registry, "SELECT") == 1  # the dialect ran this one: observed


def test_a_failing_statement_propagates_unchanged_and_is_not_counted(
    engine: Engine, make_sentinel, registry
) -> None:
    make_sentinel()
    with engine.connect() as conn, pytest.raises(Exception, match="no such table"):
        conn.execute(text("SELECT * FROM missing_table"))
    assert _statements(registry, "SELECT") == 0
    errors = "asyncsentinel_instrumentation_errors_total"
    assert sample(registry, errors, component="source.sqlalchemy") == 0


class OwnExecutemany(SQLiteDialect_pysqlite):
    """A dialect with its own ``do_executemany``, as psycopg2's, mysqlclient's and others have."""

    supports_statement_cache = True

    def do_executemany(
        self, cursor: Any, statement: str, parameters: Any, context: Any = None
    ) -> None:
        cursor.executemany(statement, parameters)


dialects.register("sqlite.ownexecutemany", __name__, "OwnExecutemany")


def test_a_dialect_that_overrides_a_statement_method_is_observed(
    tmp_path: Path, make_sentinel, registry
) -> None:
    """Its method is wrapped once an engine of it is seen (here at its first checkout: it was
    created before asyncsentinel), every statement counted once, and restored at the end."""
    original = OwnExecutemany.__dict__["do_executemany"]
    engine = create_engine(f"sqlite+ownexecutemany:///{tmp_path / 'own.db'}")
    sentinel = make_sentinel()
    try:
        with engine.begin() as conn:
            _metadata.create_all(conn)
            conn.execute(insert(_items), [{"name": f"n{i}"} for i in range(4)])  # executemany
            assert conn.execute(select(_items.c.id)).all() == [(1,), (2,), (3,), (4,)]
        assert OwnExecutemany.__dict__["do_executemany"] is not original
        assert _statements(registry, "INSERT") == 1
        assert _statements(registry, "SELECT") == 1
    finally:
        engine.dispose()
        sentinel.close()
    assert OwnExecutemany.__dict__["do_executemany"] is original


def test_removing_asyncsentinel_restores_the_dialect_methods(make_sentinel) -> None:
    from sqlalchemy.engine.default import DefaultDialect

    names = ("do_execute", "do_executemany", "do_execute_no_params", "connect")
    originals = {n: DefaultDialect.__dict__[n] for n in names}
    sentinel = make_sentinel()
    assert all(DefaultDialect.__dict__[n] is not f for n, f in originals.items())
    sentinel.close()
    assert all(DefaultDialect.__dict__[n] is f for n, f in originals.items())


def _sample_sum(registry: Any, name: str) -> float:
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)


def test_two_sentinels_count_a_requests_statements_once(tmp_path: Path, make_sentinel) -> None:
    """Two Sentinels in one process (two apps, or a harness beside the app) both time every
    statement, but a request's statements, checkouts and N+1 are counted by one of them only."""
    from prometheus_client import CollectorRegistry
    from sqlalchemy.pool import QueuePool
    from starlette.routing import Route

    from asyncsentinel.context import enter_request, exit_request

    pooled = create_engine(f"sqlite:///{tmp_path / 'two.db'}", poolclass=QueuePool)
    with pooled.begin() as conn:
        _metadata.create_all(conn)
    registries = [CollectorRegistry(), CollectorRegistry()]
    first, _second = (make_sentinel(registry=r, loop_monitor=False) for r in registries)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/orders/7",
        "root_path": "",
        "route": Route("/orders/{order_id}", endpoint=lambda request: None),
    }
    state = first.begin_request(scope)
    assert state is not None
    token = enter_request(state)
    try:
        with pooled.connect() as conn:
            for n in range(6):  # one shape six times: an N+1 at the default threshold of 5
                conn.execute(select(_items.c.id).where(_items.c.id == n)).all()
    finally:
        exit_request(token)
        first.end_request(state, None)
    pooled.dispose()

    counted = [
        {
            "statements": _statements(registry, "SELECT"),
            "requests": _sample_sum(registry, "asyncsentinel_request_db_queries_count"),
            "request_statements": _sample_sum(registry, "asyncsentinel_request_db_queries_sum"),
            "n_plus_one": sum(
                s.value
                for m in registry.collect()
                for s in m.samples
                if s.name == "asyncsentinel_findings_total" and s.labels["kind"] == "n_plus_one"
            ),
            "checkouts": _sample_sum(registry, "db_client_connection_wait_time_seconds_count"),
        }
        for registry in registries
    ]
    # Both time the statements and the checkout; only the request's Sentinel counts for it.
    assert counted[0] == {
        "statements": 6,
        "requests": 1,
        "request_statements": 6,
        "n_plus_one": 1,
        "checkouts": 1,
    }
    assert counted[1] == {
        "statements": 6,
        "requests": 0,
        "request_statements": 0,
        "n_plus_one": 0,
        "checkouts": 1,
    }
    assert state.db is not None and state.db.count == 6
    assert len(state.db.checkouts or []) == 1
