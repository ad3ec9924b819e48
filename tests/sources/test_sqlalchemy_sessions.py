"""Session misuse end to end: a real FastAPI app under uvicorn, real PostgreSQL through asyncpg.

Each finding (shared session, lazy load in async code, session collected unclosed, start-up
advice) is triggered over HTTP and checked where a user sees it: the Prometheus counter, the span
event with the culprit's file and line, and the log line naming ``file:line``. Each has a healthy
twin that must stay silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import ForeignKey, create_engine, func, select, text
from sqlalchemy.exc import InvalidRequestError, MissingGreenlet
from sqlalchemy.ext.asyncio import (
    AsyncAttrs,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)
from sqlalchemy.pool import NullPool

from asyncsentinel import (
    CONNECTION_LEAKED,
    DB_CONFIGURATION_ADVICE,
    LAZY_LOAD_IN_ASYNC,
    SESSION_SHARED_ACROSS_TASKS,
    Sentinel,
)
from asyncsentinel.sources.sqlalchemy_sessions import SQLAlchemySessionSource
from tests.sources.dbapps import Outputs
from tests.support import asyncpg_sqlalchemy_url, line_of, serve

HERE = __file__
SECRET = "sk_live_4f9Qz7SECRETVALUE"  # must never reach a metric, span or log


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sessions_test_authors"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(back_populates="author")  # lazy="select": advised


class Book(Base):
    __tablename__ = "sessions_test_books"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(ForeignKey("sessions_test_authors.id"))
    author: Mapped[Author] = relationship(back_populates="books", lazy="raise")


def at(marker: str) -> tuple[str, int]:
    """The line of this file that carries ``# <- marker``: the expected culprit."""
    return HERE, line_of(HERE, f"# <- {marker}")


@pytest.fixture(scope="module")
def database(postgres_url: str) -> str:
    """The async URL of PostgreSQL with this module's tables created and seeded."""
    url = asyncpg_sqlalchemy_url(postgres_url)

    async def create() -> None:
        engine = create_async_engine(url, poolclass=NullPool)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(
                Author.__table__.insert(), [{"id": i, "name": f"author {i}"} for i in (1, 2, 3)]
            )
            await conn.execute(
                Book.__table__.insert(),
                [{"id": i, "title": f"book {i}", "author_id": i % 3 + 1} for i in range(1, 10)],
            )
        await engine.dispose()

    asyncio.run(create())
    return url


class Db:
    """The app's database handles, created in its lifespan on the server's own loop."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # the recommended configuration
    default_sessions: async_sessionmaker[AsyncSession]  # expire_on_commit left at True
    global_session: AsyncSession


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    """The recommended dependency: one session per request, committed, always closed."""
    async with request.app.state.db.sessions() as session:
        yield session
        await session.commit()


SessionDep = Annotated[AsyncSession, Depends(get_db)]


def make_app(url: str, outputs: Outputs, **engine_options: Any) -> tuple[FastAPI, Db, Sentinel]:
    db = Db()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db.engine = create_async_engine(url, **engine_options)
        db.sessions = async_sessionmaker(db.engine, expire_on_commit=False)
        db.default_sessions = async_sessionmaker(db.engine)
        db.global_session = db.sessions()
        yield
        await db.global_session.close()
        await db.engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.state.db = db
    return app, db, outputs.instrument(app)


AppFactory = Callable[..., tuple[FastAPI, Db, Sentinel]]


@pytest.fixture
def app_factory(database: str, outputs: Outputs) -> AppFactory:
    """Apps on the module's database, instrumented (closed after the test by ``outputs``)."""

    def factory(**engine_options: Any) -> tuple[FastAPI, Db, Sentinel]:
        return make_app(database, outputs, **engine_options)

    return factory


def assert_no_secret(outputs: Outputs, s: Sentinel) -> None:
    assert all(SECRET not in r.getMessage() for r in outputs.logs.records)
    for span in outputs.spans.get_finished_spans():
        for event in span.events:
            assert SECRET not in repr(dict(event.attributes or {}))
    for finding in s.findings():
        assert SECRET not in repr(finding.as_dict())
    body, _ = s.render_metrics()
    assert SECRET.encode() not in body


# --- session_shared_across_tasks -------------------------------------------------------------
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_session_used_by_two_overlapping_tasks_is_reported_before_sqlalchemy_refuses(
    loop: str, app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, sentinel = app_factory()
    refusals: list[BaseException] = []

    @app.get("/report")
    async def report() -> dict[str, int]:
        async with db.sessions() as session:

            async def count_books() -> int:
                stmt = select(func.count()).select_from(Book).where(Book.title != SECRET)
                return (await session.execute(stmt)).scalar_one()

            async def count_authors() -> int:
                stmt = select(func.count()).select_from(Author)
                return (await session.execute(stmt)).scalar_one()  # <- second task

            try:
                async with asyncio.TaskGroup() as tg:
                    books = tg.create_task(count_books(), name="count-books")
                    authors = tg.create_task(count_authors(), name="count-authors")
            except* InvalidRequestError as group:
                refusals.extend(group.exceptions)  # SQLAlchemy may refuse too; not always
            if refusals:
                return {"books": -1, "authors": -1}
            return {"books": books.result(), "authors": authors.result()}

    with serve(app, loop=loop) as base:
        assert httpx.get(f"{base}/report").status_code == 200

    event = outputs.wait_reported(SESSION_SHARED_ACROSS_TASKS, "/report", at("second task"))
    assert event["asyncsentinel.evidence.detected_by"] == "overlap"
    assert event["asyncsentinel.evidence.task"] == "count-authors"
    assert event["asyncsentinel.evidence.other_task"] == "count-books"
    assert event["asyncsentinel.evidence.operation"] == "execute"
    assert len(sentinel.findings(SESSION_SHARED_ACROSS_TASKS)) == 1  # once per session+request
    assert_no_secret(outputs, sentinel)


def test_global_session_used_by_two_requests_names_both_routes(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, sentinel = app_factory()

    @app.get("/authors/{author_id}")
    async def get_author(author_id: int) -> dict[str, str]:
        author = await db.global_session.get(Author, author_id)
        assert author is not None
        return {"name": author.name}

    @app.get("/books/search")
    async def search_books() -> dict[str, int]:
        stmt = select(Book).where(Book.title == SECRET)
        found = (await db.global_session.scalars(stmt)).all()  # <- global session
        return {"found": len(found)}

    with serve(app) as base:
        assert httpx.get(f"{base}/authors/1").status_code == 200
        assert sentinel.findings(SESSION_SHARED_ACROSS_TASKS) == []  # one request: fine so far
        assert httpx.get(f"{base}/books/search").status_code == 200

    event = outputs.wait_reported(
        SESSION_SHARED_ACROSS_TASKS, "/books/search", at("global session")
    )
    assert event["asyncsentinel.evidence.detected_by"] == "requests"
    assert event["asyncsentinel.evidence.route"] == "/books/search"
    assert event["asyncsentinel.evidence.other_route"] == "/authors/{author_id}"
    assert event["asyncsentinel.evidence.concurrent"] is False  # one after the other
    assert event["asyncsentinel.evidence.task"] != event["asyncsentinel.evidence.other_task"]
    assert_no_secret(outputs, sentinel)


def test_global_session_used_by_two_concurrent_requests_is_reported_as_concurrent(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, sentinel = app_factory()
    slow_started = asyncio.Event()

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        slow_started.set()  # the next statement enters the session operation before yielding
        await db.global_session.execute(select(func.pg_sleep(0.3)))
        return {"slept": "0.3"}

    @app.get("/fast")
    async def fast() -> dict[str, str]:
        await slow_started.wait()
        try:
            await db.global_session.execute(select(1))  # <- concurrent request
        except InvalidRequestError:
            return {"refused": "by SQLAlchemy"}
        return {"refused": "no"}

    async def both(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            await asyncio.gather(client.get("/slow"), client.get("/fast"))

    with serve(app) as base:
        asyncio.run(both(base))

    event = outputs.wait_reported(SESSION_SHARED_ACROSS_TASKS, "/fast", at("concurrent request"))
    assert event["asyncsentinel.evidence.detected_by"] == "requests"
    assert event["asyncsentinel.evidence.other_route"] == "/slow"
    assert event["asyncsentinel.evidence.concurrent"] is True
    assert len(sentinel.findings(SESSION_SHARED_ACROSS_TASKS)) == 1


def test_sqlalchemy_refusal_is_counted_when_the_first_user_was_not_seen(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    # NullPool: every checkout connects, so the first user is "provisioning a new connection"
    # across an await. That first user is an awaitable_attrs load (no AsyncSession method), so
    # only SQLAlchemy's own refusal can tell.
    app, db, _ = app_factory(poolclass=NullPool)
    refusals: list[BaseException] = []

    @app.get("/authors/{author_id}/summary")
    async def summary(author_id: int) -> dict[str, int]:
        async with db.sessions() as session:
            author = await session.get(Author, author_id)
            assert author is not None
            await session.commit()  # connection released; the next use provisions a new one

            async def load_books() -> int:
                return len(await author.awaitable_attrs.books)

            async def count_books() -> int:
                stmt = select(func.count()).select_from(Book)
                return (await session.execute(stmt)).scalar_one()  # <- refused

            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(load_books(), name="load-books")
                    tg.create_task(count_books(), name="count-books")
            except* InvalidRequestError as group:
                refusals.extend(group.exceptions)
            return {"refused": len(refusals)}

    with serve(app) as base:
        assert httpx.get(f"{base}/authors/1/summary").json() == {"refused": 1}

    assert "concurrent operations are not permitted" in str(refusals[0])
    event = outputs.wait_reported(
        SESSION_SHARED_ACROSS_TASKS, "/authors/{author_id}/summary", at("refused")
    )
    assert event["asyncsentinel.evidence.detected_by"] == "sqlalchemy_error"
    assert event["asyncsentinel.evidence.task"] == "count-books"


def test_session_per_task_and_per_request_is_not_reported(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, sentinel = app_factory()

    @app.get("/authors/{author_id}")
    async def get_author(author_id: int, session: SessionDep) -> dict[str, Any]:
        # Sequential use of the request's session across awaits (and a commit) is fine.
        author = await session.get(Author, author_id)
        await asyncio.sleep(0.01)
        count = await session.scalar(select(func.count()).select_from(Book))
        await session.commit()
        books = (await session.scalars(select(Book).where(Book.author_id == author_id))).all()
        assert author is not None
        return {"name": author.name, "count": count, "books": len(books)}

    @app.get("/report")
    async def report() -> dict[str, int]:
        async def count(model: type[Base]) -> int:
            async with db.sessions() as session:  # one session per task
                stmt = select(func.count()).select_from(model)
                return (await session.execute(stmt)).scalar_one()

        async with asyncio.TaskGroup() as tg:
            books = tg.create_task(count(Book))
            authors = tg.create_task(count(Author))
        return {"books": books.result(), "authors": authors.result()}

    async def load(base: str) -> None:
        async with httpx.AsyncClient(base_url=base) as client:
            responses = await asyncio.gather(
                *(client.get(f"/authors/{i % 3 + 1}") for i in range(12)),
                *(client.get("/report") for _ in range(6)),
            )
        assert {r.status_code for r in responses} == {200}

    with serve(app) as base:
        asyncio.run(load(base))

    outputs.assert_silent(sentinel, SESSION_SHARED_ACROSS_TASKS)
    errors = {"component": "source.sqlalchemy_sessions"}
    assert outputs.sample("asyncsentinel_instrumentation_errors_total", **errors) == 0


def test_global_sync_session_used_by_two_requests_is_reported(outputs: Outputs) -> None:
    # A synchronous Session (SQLite, the stdlib driver) in sync endpoints: FastAPI runs them in
    # worker threads, where there is no task; the detection works through after_begin.
    engine = create_engine("sqlite://")
    shared = Session(engine)
    app = FastAPI()
    outputs.instrument(app)

    @app.get("/ping")
    def ping() -> dict[str, int]:
        value = shared.execute(text("select 1")).scalar_one()
        shared.commit()
        return {"value": value}

    @app.get("/pong")
    def pong() -> dict[str, int]:
        value = shared.execute(text("select 2")).scalar_one()  # <- sync global, 2nd request
        shared.commit()
        return {"value": value}

    try:
        with serve(app) as base:
            assert httpx.get(f"{base}/ping").status_code == 200
            assert httpx.get(f"{base}/pong").status_code == 200
        event = outputs.wait_reported(
            SESSION_SHARED_ACROSS_TASKS, "/pong", at("sync global, 2nd request")
        )
        assert event["asyncsentinel.evidence.other_route"] == "/ping"
        assert str(event["asyncsentinel.evidence.task"]).startswith("thread ")
    finally:
        shared.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(assignment=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=6))
def test_shared_sessions_are_found_exactly_when_tasks_share_one(assignment: list[int]) -> None:
    """Tasks i use session assignment[i], all at once: a finding per session shared by 2+ tasks."""
    from asyncsentinel.config import Settings
    from asyncsentinel.findings import Dispatcher
    from asyncsentinel.sinks.memory import MemorySink

    memory = MemorySink(1000)
    source = SQLAlchemySessionSource(Settings.load({}), Dispatcher([memory]))

    async def scenario(path: str) -> None:
        # NullPool on a file: every session provisions its own connection, across an await.
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool)
        sessions = [AsyncSession(engine) for _ in range(4)]

        async def work(session: AsyncSession) -> None:
            for _ in range(2):
                # SQLAlchemy refusing (or failing) a concurrent use is part of the scenario.
                with contextlib.suppress(Exception):
                    await session.execute(select(1))
                await asyncio.sleep(0)

        async with asyncio.TaskGroup() as tg:
            for index in assignment:
                tg.create_task(work(sessions[index]))
        for session in sessions:
            await session.close()
        await engine.dispose()

    source.install()
    try:
        with tempfile.TemporaryDirectory() as directory:
            asyncio.run(scenario(os.path.join(directory, "db.sqlite")))
    finally:
        source.uninstall()
    shared = {i for i in assignment if assignment.count(i) > 1}
    findings = memory.findings(SESSION_SHARED_ACROSS_TASKS)
    assert len(findings) == len(shared)
    assert all(f.evidence["detected_by"] in ("overlap", "sqlalchemy_error") for f in findings)


# --- lazy_load_in_async ----------------------------------------------------------------------
def test_lazy_relationship_load_is_reported_and_the_error_still_reaches_the_app(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, sentinel = app_factory()
    seen: list[BaseException] = []

    @app.get("/authors/{author_id}/books")
    async def author_books(author_id: int) -> list[str]:
        async with db.sessions() as session:
            author = await session.get(Author, author_id)
            assert author is not None
            try:
                books = author.books  # <- lazy relationship
            except Exception as exc:
                seen.append(exc)
                raise
            return [b.title for b in books]

    with serve(app) as base:
        assert httpx.get(f"{base}/authors/2/books").status_code == 500

    assert len(seen) == 1 and type(seen[0]) is MissingGreenlet
    assert "greenlet_spawn has not been called" in str(seen[0])
    event = outputs.wait_reported(
        LAZY_LOAD_IN_ASYNC, "/authors/{author_id}/books", at("lazy relationship")
    )
    assert event["asyncsentinel.evidence.attribute"] == "Author.books"
    assert event["asyncsentinel.evidence.loader"] == "relationship"
    assert len(sentinel.findings(LAZY_LOAD_IN_ASYNC)) == 1


def test_lazy_load_wrapped_by_the_driver_is_reported_too(outputs: Outputs, tmp_path: Any) -> None:
    # aiosqlite wraps MissingGreenlet in a StatementError (.orig): still a lazy load refused.
    url = f"sqlite+aiosqlite:///{tmp_path / 'shop.sqlite'}"

    async def create() -> None:
        engine = create_async_engine(url, poolclass=NullPool)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(Author.__table__.insert(), [{"id": 1, "name": "author 1"}])
            await conn.execute(Book.__table__.insert(), [{"id": 1, "title": "b", "author_id": 1}])
        await engine.dispose()

    asyncio.run(create())
    app, db, sentinel = make_app(url, outputs)
    try:

        @app.get("/authors/{author_id}/books")
        async def author_books(author_id: int) -> list[str]:
            async with db.sessions() as session:
                author = await session.get(Author, author_id)
                assert author is not None
                return [b.title for b in author.books]  # <- lazy load wrapped by aiosqlite

        with serve(app) as base:
            assert httpx.get(f"{base}/authors/1/books").status_code == 500
        event = outputs.wait_reported(
            LAZY_LOAD_IN_ASYNC, "/authors/{author_id}/books", at("lazy load wrapped by aiosqlite")
        )
        assert event["asyncsentinel.evidence.attribute"] == "Author.books"
    finally:
        sentinel.close()
        # aiosqlite created the cursor coroutine SQLAlchemy then refused to await: the
        # application's bug, collected here so its RuntimeWarning is not blamed on another test.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            gc.collect()


def test_expired_attribute_after_commit_is_reported(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, _ = app_factory()

    @app.post("/authors/{author_id}/touch")
    async def touch(author_id: int) -> dict[str, str]:
        async with db.default_sessions() as session:  # expire_on_commit=True
            author = await session.get(Author, author_id)
            assert author is not None
            await session.commit()
            return {"name": author.name}  # <- expired attribute

    with serve(app) as base:
        assert httpx.post(f"{base}/authors/3/touch").status_code == 500

    event = outputs.wait_reported(
        LAZY_LOAD_IN_ASYNC, "/authors/{author_id}/touch", at("expired attribute")
    )
    assert event["asyncsentinel.evidence.attribute"] == "Author.name"
    assert event["asyncsentinel.evidence.loader"] == "column"
    assert event["asyncsentinel.evidence.expired"] is True


def test_eager_and_explicit_loading_is_not_reported(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, sentinel = app_factory()

    @app.get("/authors/{author_id}/books")
    async def author_books(author_id: int) -> list[str]:
        async with db.sessions() as session:
            stmt = (
                select(Author)
                .where(Author.id == author_id)
                .options(selectinload(Author.books).joinedload(Book.author))
            )
            author = (await session.scalars(stmt)).one()
            # Book.author is lazy="raise": loaded explicitly above, so access is free.
            return [f"{b.title} by {b.author.name}" for b in author.books]

    @app.get("/books/{book_id}/author")
    async def book_author(book_id: int) -> dict[str, str]:
        async with db.sessions() as session:
            book = await session.get(Book, book_id, options=[joinedload(Book.author)])
            assert book is not None
            books = await book.author.awaitable_attrs.books  # explicit async load: fine
            return {"name": book.author.name, "books": str(len(books))}

    with serve(app) as base:
        assert httpx.get(f"{base}/authors/1/books").status_code == 200
        assert httpx.get(f"{base}/books/4/author").status_code == 200

    outputs.assert_silent(sentinel, LAZY_LOAD_IN_ASYNC)


# --- connection_leaked (session) ---------------------------------------------------------------
# SQLAlchemy warns about the connection the collected session held: that is the point of the test.
@pytest.mark.filterwarnings(
    "ignore:The garbage collector is trying to clean up:sqlalchemy.exc.SAWarning"
)
def test_session_collected_while_holding_a_connection_is_reported_where_it_was_created(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, sentinel = app_factory()

    @app.get("/authors/count")
    async def count_authors() -> dict[str, int]:
        session = db.sessions()  # <- leaked session
        count = await session.scalar(select(func.count()).select_from(Author))
        return {"count": int(count or 0)}  # never closed: the transaction keeps the connection

    @app.post("/collect")
    async def collect() -> dict[str, int]:
        return {"collected": gc.collect()}

    with serve(app) as base:
        assert httpx.get(f"{base}/authors/count").status_code == 200
        assert httpx.post(f"{base}/collect").status_code == 200
        event = outputs.wait_reported(CONNECTION_LEAKED, "/authors/count", at("leaked session"))
    assert event["asyncsentinel.evidence.object"] == "session"
    # The sqlalchemy source reports the connection itself too, told apart by evidence.object.
    objects = sorted(str(f.evidence["object"]) for f in sentinel.findings(CONNECTION_LEAKED))
    assert objects.count("session") == 1
    assert set(objects) <= {"session", "connection"}


def test_closed_and_committed_sessions_are_not_reported_when_collected(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, sentinel = app_factory()

    @app.get("/authors/count")
    async def count_authors() -> dict[str, int]:
        async with db.sessions() as session:
            count = await session.scalar(select(func.count()).select_from(Author))
        committed = db.sessions()  # not closed, but its transaction ended: no connection held
        await committed.scalar(select(func.count()).select_from(Book))
        await committed.commit()
        return {"count": int(count or 0)}

    @app.post("/collect")
    async def collect() -> dict[str, int]:
        return {"collected": gc.collect()}

    with serve(app) as base:
        for _ in range(3):
            assert httpx.get(f"{base}/authors/count").status_code == 200
        assert httpx.post(f"{base}/collect").status_code == 200
        assert httpx.post(f"{base}/collect").status_code == 200  # drains run on the loop

    outputs.assert_silent(sentinel, CONNECTION_LEAKED)


# --- db_configuration_advice ---------------------------------------------------------------------
def test_expire_on_commit_and_lazy_relationships_are_advised_once(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, sentinel = app_factory()

    @app.get("/authors/{author_id}")
    async def get_author(author_id: int) -> dict[str, str]:
        async with db.default_sessions() as session:  # <- default maker
            author = await session.get(Author, author_id)
            assert author is not None
            return {"name": author.name}

    with serve(app) as base:
        for author_id in (1, 2, 3, 1):
            assert httpx.get(f"{base}/authors/{author_id}").status_code == 200

    advice = sentinel.findings(DB_CONFIGURATION_ADVICE)
    assert {str(f.severity) for f in advice} == {"info"}
    makers = [f for f in advice if f.evidence.get("object") == "async_sessionmaker"]
    assert len(makers) == 1 and makers[0].evidence["setting"] == "expire_on_commit"
    relationships = [f.evidence.get("relationship") for f in advice]
    assert relationships.count("Author.books") == 1
    assert "Book.author" not in relationships  # lazy="raise" is the recommended declaration
    assert outputs.findings_total(DB_CONFIGURATION_ADVICE, "") == len(advice)

    outputs.wait_reported(DB_CONFIGURATION_ADVICE, "", at("default maker"))
    # The relationship is located at its declaration in the model.
    books = next(f for f in advice if f.evidence.get("relationship") == "Author.books")
    assert books.culprit is not None and books.culprit.filename == HERE
    assert "books: Mapped[list[Book]] = relationship(" in books.culprit.source_line
    assert any(
        f"{HERE}:{books.culprit.lineno}" in t for t in outputs.log_lines(DB_CONFIGURATION_ADVICE)
    )


def test_recommended_configuration_gets_no_session_advice(
    app_factory: AppFactory, outputs: Outputs
) -> None:
    app, db, sentinel = app_factory()

    @app.get("/books/{book_id}")
    async def get_book(book_id: int) -> dict[str, str]:
        async with db.sessions() as session:  # expire_on_commit=False
            stmt = select(Book).where(Book.id == book_id).options(joinedload(Book.author))
            book = (await session.scalars(stmt)).one()
            return {"title": book.title, "author": book.author.name}

    with serve(app) as base:
        assert httpx.get(f"{base}/books/5").status_code == 200

    advice = sentinel.findings(DB_CONFIGURATION_ADVICE)
    session_advice = [f for f in advice if f.evidence.get("object")]  # not engine/pool advice
    assert [f for f in session_advice if f.evidence["object"] != "relationship"] == []
    assert "Book.author" not in [f.evidence.get("relationship") for f in advice]
    events = [dict(e.attributes or {}) for _, e in outputs.events(DB_CONFIGURATION_ADVICE)]
    objects = {e.get("asyncsentinel.evidence.object") for e in events}
    assert objects <= {"relationship", None}  # None: the engine's own advice (pool_pre_ping)
    assert "Book.author" not in {e.get("asyncsentinel.evidence.relationship") for e in events}


# --- containment ---------------------------------------------------------------------------------
def test_an_internal_error_of_the_detector_never_reaches_the_request(
    app_factory: AppFactory, outputs: Outputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug of asyncsentinel's own cannot be caused for real: simulate one in the lookup every
    # session hook goes through (creation, begin, each AsyncSession operation).
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated asyncsentinel bug")

    monkeypatch.setattr(SQLAlchemySessionSource, "_record_for", broken)
    app, _, _ = app_factory()

    @app.get("/authors/{author_id}")
    async def get_author(author_id: int, session: SessionDep) -> dict[str, str]:
        author = await session.get(Author, author_id)
        assert author is not None
        return {"name": author.name}

    with serve(app) as base:
        response = httpx.get(f"{base}/authors/2")
    assert response.status_code == 200 and response.json() == {"name": "author 2"}
    errors = outputs.sample(
        "asyncsentinel_instrumentation_errors_total", component="source.sqlalchemy_sessions"
    )
    assert errors >= 3  # session created, transaction begun, operations: each one contained


# --- removal -------------------------------------------------------------------------------------
def test_uninstall_restores_every_patched_sqlalchemy_function() -> None:
    from sqlalchemy.orm import attributes, sessionmaker

    from asyncsentinel.config import Settings
    from asyncsentinel.findings import Dispatcher

    impl = getattr(attributes, "_AttributeImpl", None) or attributes.AttributeImpl
    targets = [
        (AsyncSession, "execute"),
        (AsyncSession, "commit"),
        (Session, "__init__"),
        (async_sessionmaker, "__call__"),
        (sessionmaker, "__call__"),
        (impl, "_fire_loader_callables"),
    ]
    before = {t: t[0].__dict__[t[1]] for t in targets}
    first = SQLAlchemySessionSource(Settings.load({}), Dispatcher([]))
    second = SQLAlchemySessionSource(Settings.load({}), Dispatcher([]))
    first.install()
    second.install()
    assert all(t[0].__dict__[t[1]] is not before[t] for t in targets)
    first.uninstall()  # order independent: the patches stay while one source remains
    assert all(t[0].__dict__[t[1]] is not before[t] for t in targets)
    second.uninstall()
    assert {t: t[0].__dict__[t[1]] for t in targets} == before
