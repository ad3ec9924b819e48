"""SQLAlchemy pool accounting without HTTP: threads, invalidation, detach, dispose, naming, and
the source's own hygiene (uninstall restores everything; its errors never reach the app)."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool
from starlette.routing import Route

from asyncsentinel import CONNECTION_LEAKED
from asyncsentinel.context import enter_request, exit_request
from asyncsentinel.instruments import FINDINGS
from asyncsentinel.sources.database_accounting import StatementShapes
from asyncsentinel.sources.sqlalchemy import SQLAlchemySource
from asyncsentinel.sources.sqlalchemy_engines import default_pool_name
from tests.support import sample


def _levels(registry, name: str) -> dict[str, float]:
    def get(metric: str, **labels: str) -> float:
        return sample(registry, metric, db_client_connection_pool_name=name, **labels)

    return {
        "used": get("db_client_connection_count", db_client_connection_state="used"),
        "idle": get("db_client_connection_count", db_client_connection_state="idle"),
        "pending": get("db_client_connection_pending_requests"),
        "checkouts": get("db_client_connection_wait_time_seconds_count"),
        "checkins": get("db_client_connection_use_time_seconds_count"),
        "created": get("db_client_connection_create_time_seconds_count"),
        "max": get("db_client_connection_max"),
    }


def test_thread_pool_accounting_is_exact(tmp_path: Path, make_sentinel, registry) -> None:
    sentinel = make_sentinel(pool_wait_seconds=30)
    engine = create_engine(
        f"sqlite:///{tmp_path / 'threads.db'}", pool_size=3, max_overflow=2, pool_timeout=60
    )
    name = sentinel.instrument_engine(engine, name="threads")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1")).scalar_one()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    levels = _levels(registry, name)
    assert levels["checkouts"] == levels["checkins"] == 16 * 25
    assert levels["used"] == 0 and levels["pending"] == 0
    assert levels["idle"] == engine.pool.checkedin() <= 3
    assert levels["max"] == 5
    assert 1 <= levels["created"] <= levels["checkouts"]  # overflow connections come and go
    engine.dispose()
    assert _levels(registry, name)["idle"] == 0


def test_invalidated_and_detached_connections_are_accounted(
    tmp_path: Path, make_sentinel, registry
) -> None:
    sentinel = make_sentinel()
    engine = create_engine(f"sqlite:///{tmp_path / 'inv.db'}", pool_size=2)
    name = sentinel.instrument_engine(engine)

    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert (_levels(registry, name)["used"], _levels(registry, name)["idle"]) == (0, 1)

    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        assert (_levels(registry, name)["used"], _levels(registry, name)["idle"]) == (1, 0)
        conn.invalidate()  # closes the DBAPI connection and hands its empty slot back
        assert (_levels(registry, name)["used"], _levels(registry, name)["idle"]) == (0, 0)
    assert (_levels(registry, name)["used"], _levels(registry, name)["idle"]) == (0, 0)

    with engine.connect() as conn:  # reconnects the invalidated slot
        conn.execute(text("SELECT 1"))
        conn.detach()  # leaves the pool for good
        assert _levels(registry, name)["used"] == 0
    assert (_levels(registry, name)["used"], _levels(registry, name)["idle"]) == (0, 0)

    raw = engine.raw_connection()
    raw.close()
    levels = _levels(registry, name)
    assert (levels["used"], levels["idle"]) == (0, 1)
    assert levels["checkouts"] == levels["checkins"] == 4
    engine.dispose()
    assert _levels(registry, name)["idle"] == 0


def test_null_pool_opens_and_closes_per_checkout(tmp_path: Path, make_sentinel, registry) -> None:
    sentinel = make_sentinel()
    engine = create_engine(f"sqlite:///{tmp_path / 'null.db'}", poolclass=NullPool)
    name = sentinel.instrument_engine(engine)
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    levels = _levels(registry, name)
    assert (levels["used"], levels["idle"], levels["checkouts"], levels["created"]) == (0, 0, 3, 3)


def test_engines_used_before_instrumenting_never_go_negative(
    tmp_path: Path, make_sentinel, registry
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'early.db'}")
    early = engine.connect()  # checked out before asyncsentinel exists
    early.execute(text("SELECT 1"))
    sentinel = make_sentinel()
    name = sentinel.instrument_engine(engine)
    early.close()  # its checkin is not ours to count
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    levels = _levels(registry, name)
    assert levels["used"] == 0 and levels["idle"] >= 0
    assert levels["checkouts"] == levels["checkins"] == 1
    engine.dispose()


def test_renaming_a_pool_moves_its_levels(tmp_path: Path, make_sentinel, registry) -> None:
    sentinel = make_sentinel()
    engine = create_engine(f"sqlite:///{tmp_path / 'rename.db'}")
    default = sentinel.instrument_engine(engine)
    assert default == f"sqlite:///{tmp_path / 'rename.db'}"
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        assert _levels(registry, default)["used"] == 1
        assert sentinel.instrument_engine(engine, name="primary") == "primary"
        assert _levels(registry, default)["used"] == 0
        assert _levels(registry, "primary")["used"] == 1
    assert _levels(registry, "primary")["idle"] == 1
    # An execution_options() copy of the engine is the same pool, with the same name.
    with engine.execution_options(isolation_level="SERIALIZABLE").connect() as conn:
        conn.execute(text("SELECT 1"))

    def statements(pool: str) -> float:
        return sample(
            registry,
            "db_client_operation_duration_seconds_count",
            db_system_name="sqlite",
            db_operation_name="SELECT",
            db_client_connection_pool_name=pool,
        )

    assert (statements(default), statements("primary")) == (1, 1)
    engine.dispose()


def test_async_engines_are_named_through_their_sync_engine(make_sentinel) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    sentinel = make_sentinel()
    engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    assert sentinel.instrument_engine(engine, name="cache") == "cache"
    assert sentinel.instrument_engine(engine.sync_engine) == "cache"
    with pytest.raises(TypeError, match="Engine or AsyncEngine"):
        sentinel.instrument_engine(object())
    with pytest.raises(ValueError, match="non-empty"):
        sentinel.instrument_engine(engine, name="")


@pytest.mark.parametrize(
    ("url", "name"),
    [
        (
            "postgresql+asyncpg://shop:s3cr3t@10.1.2.3:5432/shop?ssl=require",
            "postgresql+asyncpg://10.1.2.3:5432/shop",
        ),
        (
            "postgresql+asyncpg://postgres:@/postgres?host=/tmp/pg-socket",
            "postgresql+asyncpg:///tmp/pg-socket/postgres",
        ),
        ("mysql+aiomysql://root:pw@db/app", "mysql+aiomysql://db/app"),
        ("sqlite+aiosqlite:////var/lib/app.db", "sqlite+aiosqlite:////var/lib/app.db"),
        ("sqlite://", "sqlite://"),
    ],
)
def test_default_pool_name_is_the_url_without_credentials(url: str, name: str) -> None:
    assert default_pool_name(make_url(url)) == name
    assert "s3cr3t" not in default_pool_name(make_url(url))


def test_uninstall_restores_engine_and_removes_listeners(tmp_path: Path, make_sentinel) -> None:
    before = {n: Engine.__dict__[n] for n in ("__init__", "raw_connection")}
    sentinel = make_sentinel()
    source = sentinel.source("sqlalchemy")
    assert isinstance(source, SQLAlchemySource)
    assert Engine.__dict__["raw_connection"] is not before["raw_connection"]
    listeners = list(source._listeners)
    assert all(event.contains(target, name, fn) for target, name, fn in listeners)
    sentinel.close()
    assert {n: Engine.__dict__[n] for n in before} == before
    assert not any(event.contains(target, name, fn) for target, name, fn in listeners)
    engine = create_engine(f"sqlite:///{tmp_path / 'after.db'}")
    with engine.connect() as conn:  # works, and nothing is recorded any more
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    engine.dispose()


def test_errors_inside_the_source_never_reach_the_application(
    tmp_path: Path, make_sentinel, registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    sentinel = make_sentinel()
    engine = create_engine(f"sqlite:///{tmp_path / 'fault.db'}")
    sentinel.instrument_engine(engine)

    def broken(self: object, statement: str) -> object:
        # A fake fault: a real statement can't make the shape code fail.
        raise RuntimeError("boom")

    monkeypatch.setattr(StatementShapes, "shape_of", broken)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert (
        sample(
            registry, "asyncsentinel_instrumentation_errors_total", component="source.sqlalchemy"
        )
        == 1
    )
    engine.dispose()


@pytest.mark.filterwarnings(
    "ignore:The garbage collector is trying to clean up:sqlalchemy.exc.SAWarning"
)
def test_connection_collected_inside_instrumentation_is_reported_without_deadlock(
    tmp_path: Path, make_sentinel, registry
) -> None:
    """SQLAlchemy finalizes a connection nobody closed from the garbage collector, which runs
    inside whatever code allocated — here prometheus_client creating a series, holding a lock
    that reporting the leak needs again. The report waits for the next checkout instead."""
    sentinel = make_sentinel()
    engine = create_engine(f"sqlite:///{tmp_path / 'collected.db'}")
    leaks = 40

    def leak_while_creating_series() -> None:
        threshold = gc.get_threshold()
        try:
            for n in range(1, leaks + 1):
                gc.collect()
                gc.disable()  # until armed below: the leaked connection stays uncollected
                # Checked out in a request of its own route: each leak is a new series too.
                scope = {"type": "http", "method": "GET", "path": f"/leak/{n}", "root_path": ""}
                scope["route"] = Route(f"/leak/{n}", endpoint=lambda request: None)
                state = sentinel.begin_request(scope)
                assert state is not None
                token = enter_request(state)
                cycle: list[object] = [engine.connect()]
                exit_request(token)
                sentinel.end_request(state, None)
                cycle.append(cycle)  # only the cyclic collector frees it
                del cycle
                # The collection runs at the n-th allocation from here: one of them is inside
                # prometheus_client creating the series, under its lock and the sink's.
                gc.set_threshold(gc.get_count()[0] + n)
                gc.enable()
                sentinel.dispatcher.record(FINDINGS, 1, ("n_plus_one", f"/series/{n}"))
                gc.disable()
                gc.set_threshold(*threshold)
        finally:
            gc.set_threshold(*threshold)
            gc.enable()

    worker = threading.Thread(target=leak_while_creating_series, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "deadlocked"
    gc.collect()
    with engine.connect() as conn:  # the next checkout reports what had to wait
        conn.execute(text("SELECT 1"))
    leaked = sentinel.findings(CONNECTION_LEAKED)
    assert len(leaked) == leaks
    assert all(f.evidence["garbage_collected"] is True for f in leaked)
    assert {f.http_route for f in leaked} == {f"/leak/{n}" for n in range(1, leaks + 1)}
    engine.dispose()
