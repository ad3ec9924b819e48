"""The few SQLAlchemy functions the session detectors wrap, where SQLAlchemy has no event.

* ``AsyncSession`` operations (``execute``, ``get``, ``commit``...): entry and exit, to know which
  task is inside an operation on a session *while* another task enters one;
* ``Session.__init__``: where a session was created (for a session later collected unclosed);
* ``async_sessionmaker.__call__`` / ``sessionmaker.__call__``: which maker made a session;
* the attribute loader (``_AttributeImpl._fire_loader_callables``) every lazy relationship,
  expired and deferred column load goes through: where ``MissingGreenlet`` surfaces.

Each wrapper uses ``functools.wraps``, keeps the original and is shared by every installed
:class:`HookTarget`; the originals are restored when the last target leaves. A wrapper with no
target is a plain pass-through, so one that cannot be restored (someone wrapped it after us)
is harmless. Errors of the hooks are contained by the targets; what SQLAlchemy raises propagates
unchanged.
"""

from __future__ import annotations

import functools
import sys
import threading
from asyncio import Task, current_task
from collections.abc import Callable
from types import CodeType, FrameType, TracebackType
from typing import Any, Protocol

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import attributes as sa_attributes

from asyncsentinel.frames import Origin, user_origin

# AsyncSession coroutine methods that run an operation on the session (and its connection).
OPERATIONS = (
    "execute",
    "scalar",
    "scalars",
    "get",
    "get_one",
    "stream",
    "stream_scalars",
    "flush",
    "commit",
    "rollback",
    "refresh",
    "merge",
    "merge_all",
    "delete",
    "delete_all",
    "run_sync",
    "connection",
    "close",
    "reset",
    "invalidate",
)
ILLEGAL_STATE_CHANGE = "isce"
"""SQLAlchemy's error code for a session used concurrently ("concurrent operations are not
permitted", ``IllegalStateChangeError``); the same in 2.0 and 2.1."""

# The loader of lazy relationship / expired / deferred attributes: renamed in 2.1.
_ATTRIBUTE_IMPL: type[Any] | None = getattr(sa_attributes, "_AttributeImpl", None) or getattr(
    sa_attributes, "AttributeImpl", None
)
_CREATION_SEARCH_DEPTH = 12  # frames from Session.__init__ to the user's line, generously


class HookTarget(Protocol):
    """What the wrappers call; each call must contain its own errors."""

    def operation_started(
        self, session: AsyncSession, operation: str, task: Task[Any] | None, frame: FrameType
    ) -> Any:
        """*task* enters an operation; returns a token for the calls below (``None``: untracked)."""

    def operation_refused(self, token: Any, task: Task[Any] | None, frame: FrameType) -> None:
        """SQLAlchemy refused the operation as a concurrent use of the session."""

    def operation_finished(self, token: Any, task: Task[Any] | None) -> None:
        """The operation returned or raised."""

    def session_created(self, session: Session, origin: Origin | None) -> None:
        """A session was constructed; *origin* is the user code that created it."""

    def maker_used(self, maker: Any, session: Any, frame: FrameType) -> None:
        """A sessionmaker produced *session*."""

    def lazy_load_refused(self, state: Any, key: str, frame: FrameType) -> None:
        """Loading attribute *key* of *state* raised ``MissingGreenlet``."""


_targets: tuple[HookTarget, ...] = ()
_patched: list[tuple[type[Any], str, Any, Any]] = []  # (owner, name, original, replacement)
_lock = threading.Lock()


def activate(target: HookTarget) -> None:
    """Start calling *target*; the first one applies the patches."""
    global _targets
    with _lock:
        if not _patched:
            _apply()
        _targets = (*_targets, target)


def deactivate(target: HookTarget) -> None:
    """Stop calling *target*; the last one restores SQLAlchemy's originals."""
    global _targets
    with _lock:
        _targets = tuple(t for t in _targets if t is not target)
        if _targets:
            return
        for owner, name, original, replacement in reversed(_patched):
            # Someone wrapped our wrapper meanwhile: leave theirs; ours is now a pass-through.
            if owner.__dict__.get(name) is replacement:
                setattr(owner, name, original)
        _patched.clear()


def _patch(owner: type[Any], name: str, make: Callable[[Any], Any]) -> None:
    original = owner.__dict__.get(name)
    if original is None:
        return  # not in this SQLAlchemy version
    replacement = make(original)
    setattr(owner, name, replacement)
    _patched.append((owner, name, original, replacement))


def _apply() -> None:
    for operation in OPERATIONS:
        _patch(AsyncSession, operation, _wrap_operation)
    _patch(Session, "__init__", _wrap_session_init)
    _patch(async_sessionmaker, "__call__", _wrap_maker_call)
    _patch(sessionmaker, "__call__", _wrap_maker_call)
    if _ATTRIBUTE_IMPL is not None:
        _patch(_ATTRIBUTE_IMPL, "_fire_loader_callables", _wrap_fire_loader_callables)


def _wrap_operation(original: Callable[..., Any]) -> Callable[..., Any]:
    operation = original.__name__

    @functools.wraps(original)
    async def tracked(self: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        targets = _targets
        if not targets:
            return await original(self, *args, **kwargs)
        try:
            task = current_task()
        except RuntimeError:  # a coroutine driven by hand, outside any event loop
            task = None
        frame = sys._getframe()
        tokens = []  # a loop, not a comprehension: one frame less on every operation
        for target in targets:
            tokens.append((target, target.operation_started(self, operation, task, frame)))
        try:
            return await original(self, *args, **kwargs)
        except sa_exc.InvalidRequestError as exc:
            if exc.code == ILLEGAL_STATE_CHANGE:
                for target, token in tokens:
                    if token is not None:
                        target.operation_refused(token, task, frame)
            raise
        finally:
            for target, token in tokens:
                if token is not None:
                    target.operation_finished(token, task)

    return tracked


def _wrap_session_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: Session, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        targets = _targets
        if targets:
            try:
                # Where, as code and offset only: the line waits until a finding needs it.
                origin = user_origin(sys._getframe(1), _CREATION_SEARCH_DEPTH)
            except Exception:  # never fail the user's Session(); only the culprit is lost
                origin = None
            for target in targets:
                target.session_created(self, origin)

    return __init__


def _wrap_maker_call(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __call__(self: Any, **local_kw: Any) -> Any:
        session = original(self, **local_kw)
        for target in _targets:
            target.maker_used(self, session, sys._getframe())
        return session

    return __call__


def _wrap_fire_loader_callables(original: Callable[..., Any]) -> Callable[..., Any]:
    def _fire_loader_callables(self: Any, state: Any, key: str, passive: Any) -> Any:
        try:
            return original(self, state, key, passive)
        except (sa_exc.MissingGreenlet, sa_exc.StatementError) as exc:
            # Some drivers (aiosqlite) wrap MissingGreenlet in a StatementError with .orig set.
            refused = isinstance(exc, sa_exc.MissingGreenlet) or isinstance(
                getattr(exc, "orig", None), sa_exc.MissingGreenlet
            )
            # Re-raised as is; a load nested inside another reports once, at the innermost.
            if refused and _targets and not _reported_below(exc.__traceback__):
                frame = sys._getframe()
                for target in _targets:
                    target.lazy_load_refused(state, key, frame)
            raise  # the very exception, traceback included

    _LOADER_CODES.add(_fire_loader_callables.__code__)
    return functools.wraps(original)(_fire_loader_callables)


_LOADER_CODES: set[CodeType] = set()


def _reported_below(tb: TracebackType | None) -> bool:
    """Whether a loader deeper in *tb* (below the frame now catching) already reported."""
    tb = tb.tb_next if tb is not None else None
    for _ in range(1000):  # bounded, whatever the traceback looks like
        if tb is None:
            return False
        if tb.tb_frame.f_code in _LOADER_CODES:
            return True
        tb = tb.tb_next
    return True  # absurdly deep: assume it was reported rather than report twice
