"""SQLAlchemy session misuse: shared sessions, lazy loads in async code, unclosed sessions, advice.

Engines, pools and statements are the ``sqlalchemy`` source's business; this one watches sessions.

* ``session_shared_across_tasks`` — an ``AsyncSession`` entered by a second task while another
  task is still inside an operation on it. Seen *before* SQLAlchemy refuses ("This session is
  provisioning a new connection; concurrent operations are not permitted"), and also when a warm
  pool lets both operations interleave silently on one connection. Also one session (async or
  sync) used by two different requests: a global session. SQLAlchemy's own refusal (error code
  ``isce``) is reported when it comes first (the first user was outside the operations watched).
* ``lazy_load_in_async`` — an implicit load (lazy relationship, expired or deferred column) that
  SQLAlchemy refuses with ``MissingGreenlet``; the error reaches the application unchanged.
* ``connection_leaked`` (evidence ``object=session``) — a session garbage-collected while its
  transaction still held a connection; the culprit is the line that created the session.
* ``db_configuration_advice`` (info, once per object) — an ``async_sessionmaker`` (or a
  ``sessionmaker`` of ``AsyncSession``) left at ``expire_on_commit=True``, and relationships left
  on the implicit ``lazy="select"``, reported once async sessions are in use.

The advice is given by :mod:`.sqlalchemy_session_advice`. Public events where SQLAlchemy has them
(``after_begin``, ``after_transaction_end``, ``mapper_configured``); the rest through
:mod:`~asyncsentinel.sources.sqlalchemy_session_hooks`.
Findings are reported at most once per session and request, so a shared session that errs on
every statement does not flood the outputs.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper, Session, SessionTransaction

from asyncsentinel.config import Settings
from asyncsentinel.context import RequestState, current_request
from asyncsentinel.findings import (
    CONNECTION_LEAKED,
    LAZY_LOAD_IN_ASYNC,
    SESSION_SHARED_ACROSS_TASKS,
    Dispatcher,
    EvidenceValue,
    Finding,
)
from asyncsentinel.frames import Origin, origin_location, stack_of, user_culprit
from asyncsentinel.sources import Source
from asyncsentinel.sources import sqlalchemy_session_hooks as hooks
from asyncsentinel.sources.sqlalchemy_session_advice import SessionAdvice

_OUTSIDE_REQUESTS = object()  # reported_for marker: a finding outside any request was reported


class _Usage:
    """How one session is used: tasks inside an operation now, the last request that used it."""

    __slots__ = ("active", "reported_for", "request", "request_task")

    def __init__(self) -> None:
        self.active: dict[asyncio.Task[Any] | None, int] = {}  # task -> operations nested
        self.request: RequestState | None = None
        self.request_task = ""
        self.reported_for: object = None


class _SessionRecord(weakref.ref[Session]):
    """One live ``Session``: a weak reference to it whose callback runs when it is collected."""

    __slots__ = ("created_in", "holding", "key", "origin", "usage")
    key: int
    origin: Origin | None
    created_in: RequestState | None
    holding: bool  # a transaction of the session holds a connection
    usage: _Usage | None

    @classmethod
    def track(
        cls,
        session: Session,
        callback: Callable[[_SessionRecord], None],
        origin: Origin | None,
    ) -> _SessionRecord:
        self = cls(session, callback)
        self.key = id(session)
        self.origin = origin
        self.created_in = current_request()
        self.holding = False
        self.usage = None
        return self

    def use(self) -> _Usage:
        usage = self.usage
        if usage is None:
            usage = self.usage = _Usage()
        return usage


def _task_name(task: asyncio.Task[Any] | None) -> str:
    """The task's name; in sync code (a worker thread) the thread's name instead."""
    if task is not None:
        return task.get_name()
    return f"thread {threading.current_thread().name}"


def _who(name: str) -> str:
    """*name* from :func:`_task_name` as a message says it: "task X" or "thread Y"."""
    return name if name.startswith(("thread ", "another ")) else f"task {name}"


def _running_task() -> asyncio.Task[Any] | None:
    return asyncio.current_task() if asyncio._get_running_loop() is not None else None


class SQLAlchemySessionSource(SessionAdvice, Source):
    """Detects SQLAlchemy session misuse; see the module docstring for the findings."""

    name: ClassVar[str] = "sqlalchemy_sessions"

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        super().__init__(settings, dispatcher)
        self._component = f"source.{self.name}"
        self._records: dict[int, _SessionRecord] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._collected: deque[_SessionRecord] = deque()  # leaked, waiting to be reported
        self._drain_scheduled = False
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = []
        self._init_advice()
        self._installed = False

    # --- life cycle ----------------------------------------------------------------------------
    def install(self) -> None:
        """Register the session and mapper listeners and join the shared hooks."""
        self._listeners = [
            (Session, "after_begin", self._after_begin),
            (Session, "after_transaction_end", self._after_transaction_end),
            (Mapper, "mapper_configured", self._mapper_configured),
        ]
        for target, identifier, fn in self._listeners:
            event.listen(target, identifier, fn)
        self._queue_configured_mappers()
        self._installed = True
        hooks.activate(self)

    def uninstall(self) -> None:
        """Remove the listeners and leave the hooks (restored with the last source)."""
        hooks.deactivate(self)
        self._installed = False
        for target, identifier, fn in self._listeners:
            if event.contains(target, identifier, fn):
                event.remove(target, identifier, fn)
        self._listeners = []
        self._report_collected()
        self._records.clear()  # dropping the weak references drops their callbacks too

    async def start(self) -> None:
        """Remember the application's loop: sessions collected elsewhere are reported on it."""
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Report sessions collected since the last report."""
        self._report_collected()
        self._loop = None

    # --- session records -----------------------------------------------------------------------
    def _record_for(self, session: Session, origin: Origin | None = None) -> _SessionRecord:
        record = self._records.get(id(session))
        if record is None or record() is not session:
            record = _SessionRecord.track(session, self._session_collected, origin)
            self._records[record.key] = record
        return record

    def session_created(self, session: Session, origin: Origin | None) -> None:
        """A ``Session`` (also the one inside every ``AsyncSession``) was constructed."""
        try:
            if self._collected:
                self._report_collected()
            self._record_for(session, origin)
        except Exception as exc:
            self.dispatcher.report_error(self._component, exc)

    def _session_collected(self, record: _SessionRecord) -> None:
        # Runs inside the garbage collector, in any thread, possibly while that thread holds a
        # sink's lock (Prometheus label lookups allocate): never report here; queue and wake
        # the loop (or the next session created) to report it.
        if self._records.get(record.key) is record:
            del self._records[record.key]
        if not record.holding or not self._installed:
            return
        self._collected.append(record)
        loop = self._loop
        if loop is not None and not self._drain_scheduled and not loop.is_closed():
            self._drain_scheduled = True
            try:
                loop.call_soon_threadsafe(self._report_collected)
            except RuntimeError:  # closed meanwhile: the next drain point reports it
                self._drain_scheduled = False

    def _report_collected(self) -> None:
        self._drain_scheduled = False
        while self._collected:
            record = self._collected.popleft()
            try:
                self._report_leak(record)
            except Exception as exc:
                self.dispatcher.report_error(self._component, exc)

    def _report_leak(self, record: _SessionRecord) -> None:
        culprit = origin_location(record.origin) if record.origin is not None else None
        where = f" created at {culprit}" if culprit else ""
        self.dispatcher.emit(
            Finding.create(
                CONNECTION_LEAKED,
                f"a Session{where} was garbage-collected without close() while its transaction "
                "still held a database connection, which SQLAlchemy can then only terminate; "
                "use `async with sessionmaker() as session:` or a dependency that closes it",
                culprit=culprit,
                evidence={"object": "session", "in_transaction": True},
                request=record.created_in,
            )
        )

    # --- event listeners -------------------------------------------------------------------------
    def _after_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        try:
            if self._collected:
                self._report_collected()
            record = self._record_for(session)
            # A session bound to a Connection the caller owns (the "join an external
            # transaction" test pattern) does not own that connection: it cannot leak it.
            record.holding = not isinstance(session.bind, Connection)
            usage = record.usage
            if usage is not None and usage.active:
                return  # inside an AsyncSession operation, which was checked on entry
            state = current_request()
            if state is not None and (usage is None or usage.request is not state):
                self._request_changed(
                    record.use(), state, _running_task(), "begin", sys._getframe(1)
                )
        except Exception as exc:
            self.dispatcher.report_error(self._component, exc)

    def _after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        try:
            if transaction.parent is None:  # the root transaction ended: connections are back
                record = self._records.get(id(session))
                if record is not None:
                    record.holding = False
        except Exception as exc:
            self.dispatcher.report_error(self._component, exc)

    # --- shared sessions (called by the hooks) ---------------------------------------------------
    def operation_started(
        self,
        session: AsyncSession,
        operation: str,
        task: asyncio.Task[Any] | None,
        frame: FrameType,
    ) -> _Usage | None:
        """*task* enters an ``AsyncSession`` operation; returns the token for its exit."""
        try:
            self._async_in_use = True
            sync_session = session.sync_session
            record = self._records.get(id(sync_session))
            if record is None or record() is not sync_session:
                record = self._record_for(sync_session)
            usage = record.usage or record.use()
            state = current_request()
            if state is not None and usage.request is not state:
                self._request_changed(usage, state, task, operation, frame.f_back)
            active = usage.active
            depth = active.get(task, 0)
            if depth == 0 and active:
                other = _task_name(next(iter(active)))
                self._report_shared(usage, state, task, other, "overlap", operation, frame.f_back)
            active[task] = depth + 1
            return usage
        except Exception as exc:
            self.dispatcher.report_error(self._component, exc)
            return None

    def operation_refused(
        self, token: _Usage, task: asyncio.Task[Any] | None, frame: FrameType
    ) -> None:
        """SQLAlchemy refused the operation: the session is in use by another task."""
        try:
            others = [t for t in token.active if t is not task]
            other = _task_name(others[0]) if others else "another task"
            self._report_shared(
                token, current_request(), task, other, "sqlalchemy_error", "", frame.f_back
            )
        except Exception as exc:
            self.dispatcher.report_error(self._component, exc)

    def operation_finished(self, token: _Usage, task: asyncio.Task[Any] | None) -> None:
        """The operation begun with :meth:`operation_started` returned or raised."""
        try:
            active = token.active
            depth = active.get(task, 0) - 1
            if depth > 0:
                active[task] = depth
            else:
                active.pop(task, None)
            if self._mappers_to_check:
                self._check_mappers()
        except Exception as exc:
            self.dispatcher.report_error(self._component, exc)

    def _request_changed(
        self,
        usage: _Usage,
        state: RequestState,
        task: asyncio.Task[Any] | None,
        operation: str,
        frame: FrameType | None,
    ) -> None:
        previous, previous_task = usage.request, usage.request_task
        usage.request, usage.request_task = state, _task_name(task)
        if previous is not None:
            # Concurrent: the other request is inside an operation on the session right now.
            concurrent = any(t is not task for t in usage.active)
            self._report_shared(
                usage,
                state,
                task,
                previous_task,
                "requests",
                operation,
                frame,
                previous,
                concurrent,
            )

    def _report_shared(
        self,
        usage: _Usage,
        state: RequestState | None,
        task: asyncio.Task[Any] | None,
        other_task: str,
        detected_by: str,
        operation: str,
        frame: FrameType | None,
        other_request: RequestState | None = None,
        concurrent: bool = True,
    ) -> None:
        marker = state if state is not None else _OUTSIDE_REQUESTS
        if usage.reported_for is marker:
            return  # once per session and request
        usage.reported_for = marker
        this_task = _task_name(task)
        evidence: dict[str, EvidenceValue] = {
            "task": this_task,
            "other_task": other_task,
            "detected_by": detected_by,
        }
        if operation:
            evidence["operation"] = operation
        if other_request is not None and state is not None:
            evidence["route"] = state.route
            evidence["other_route"] = other_request.route
            evidence["concurrent"] = concurrent
            how = (
                f"by two requests ({other_request.method} {other_request.route} in "
                f"{_who(other_task)}, then {state.method} {state.route} in {_who(this_task)}): "
                "a session kept in a global or module-level variable"
            )
        elif detected_by == "sqlalchemy_error":
            how = (
                f"by {_who(this_task)} while {_who(other_task)} was inside an operation on it, "
                "and SQLAlchemy refused ('concurrent operations are not permitted')"
            )
        else:
            how = (
                f"by {_who(this_task)} while {_who(other_task)} was still inside an operation on it"
            )
        stack = stack_of(frame)
        self.dispatcher.emit(
            Finding.create(
                SESSION_SHARED_ACROSS_TASKS,
                f"one SQLAlchemy session was used {how}. A session is not safe for concurrent "
                "use: give every request and every concurrent task its own session",
                culprit=user_culprit(stack),
                stack=stack,
                evidence=evidence,
                request=state,
            )
        )

    # --- lazy loads ------------------------------------------------------------------------------
    def lazy_load_refused(self, state: Any, key: str, frame: FrameType) -> None:
        """SQLAlchemy raised ``MissingGreenlet`` loading attribute *key* of *state*."""
        try:
            attribute = f"{state.class_.__name__}.{key}"
            is_relationship = key in state.mapper.relationships
            expired = key in state.expired_attributes
            if is_relationship:
                why = "a lazy relationship load"
                fix = (
                    "load it eagerly (selectinload/joinedload), await "
                    f"obj.awaitable_attrs.{key}, or declare lazy='raise'"
                )
            elif expired:
                why = "a reload of an expired attribute (expire_on_commit=True?)"
                fix = "use expire_on_commit=False or `await session.refresh(obj)` first"
            else:
                why = "a deferred column load"
                fix = "undefer the column in the query or `await session.refresh(obj, [...])`"
            stack = stack_of(frame.f_back)
            self.dispatcher.emit(
                Finding.create(
                    LAZY_LOAD_IN_ASYNC,
                    f"accessing {attribute} in async code triggered {why}, which SQLAlchemy "
                    f"refused with MissingGreenlet (implicit IO outside greenlet_spawn); {fix}",
                    culprit=user_culprit(stack),
                    stack=stack,
                    evidence={
                        "attribute": attribute,
                        "loader": "relationship" if is_relationship else "column",
                        "expired": expired,
                    },
                )
            )
        except Exception as exc:
            self.dispatcher.report_error(self._component, exc)
