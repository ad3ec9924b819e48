"""Statement and connection timing: the dialect's ``do_execute``, ``do_executemany``,
``do_execute_no_params`` and ``connect`` methods, wrapped at class level.

Every statement SQLAlchemy runs (single, executemany, without parameters, each insertmanyvalues
batch) ends in one of the three ``do_execute*`` methods of the engine's dialect. Wrapping them
where they are defined — ``DefaultDialect`` for all of SQLAlchemy's own dialects, plus any dialect
class that overrides one (psycopg2's ``do_executemany``) once an engine of it is seen — times
each statement for one extra Python call. SQLAlchemy's ``do_execute*`` *events* would do the same
through its event dispatch: asyncsentinel's listener of them (which also had to run the
listeners registered after it) cost ~1 µs more per statement, measured side by side
(``benchmarks/README.md``); connection events (``before/after_cursor_execute``) cost about 9 µs,
because any connection listener makes SQLAlchemy run every connect, begin and commit through its
event machinery. ``connect`` (a new DBAPI connection) is wrapped rather than listened to
(``do_connect``) for the same reason: one dialect event listener of any kind makes SQLAlchemy
consult the dialect's event lists on every statement (~0.5 µs).

What a wrapper cannot see: a statement that an application's own ``do_execute*`` event listener
executed itself (it returned True, so SQLAlchemy never called the dialect's method), a
connection that a ``do_connect`` listener made, and the statements of a dialect class that
overrides one of the methods, run on a connection checked out before asyncsentinel saw any
engine of that class.

The wrappers are shared by every installed source (:data:`ACTIVE`) and restored when the last one
leaves; a wrapper found in place without sources (something wrapped it after us) passes through.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.engine.default import DefaultDialect

from asyncsentinel.sources._shared_wrappers import SharedWrappers

WRAPPED_METHODS = ("do_execute", "do_executemany", "do_execute_no_params", "connect")
"""The dialect methods every statement, or every new connection, goes through."""

_perf_ns = time.perf_counter_ns
_MARKER = "__asyncsentinel_statement_hook__"


class DialectObserver(Protocol):
    """What the wrappers tell: a statement that ran successfully, a connection that was opened,
    and how long each took."""

    def executed(self, context: Any, statement: str, elapsed_ns: int) -> None: ...

    def connected(self, connection: Any, elapsed_ns: int) -> None: ...


ACTIVE: list[DialectObserver] = []
"""The installed observers; read by every wrapper on every statement (changed in place)."""


# Two statement wrappers of the same shape, written out: the signatures differ, and a generic
# wrapper (or a helper call to tell the observers) would cost another call per statement.
def _wrap_with_parameters(original: Callable[..., Any]) -> Callable[..., Any]:
    """The wrapper of ``do_execute`` and ``do_executemany`` (one signature)."""

    @functools.wraps(original)
    def with_parameters(
        self: Any, cursor: Any, statement: str, parameters: Any, context: Any = None
    ) -> Any:
        if not ACTIVE or context is None:
            return original(self, cursor, statement, parameters, context)
        start = _perf_ns()
        result = original(self, cursor, statement, parameters, context)
        elapsed = _perf_ns() - start
        for observer in ACTIVE:
            observer.executed(context, statement, elapsed)
        return result

    setattr(with_parameters, _MARKER, True)
    return with_parameters


def _wrap_do_execute_no_params(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def do_execute_no_params(self: Any, cursor: Any, statement: str, context: Any = None) -> Any:
        if not ACTIVE or context is None:
            return original(self, cursor, statement, context)
        start = _perf_ns()
        result = original(self, cursor, statement, context)
        elapsed = _perf_ns() - start
        for observer in ACTIVE:
            observer.executed(context, statement, elapsed)
        return result

    setattr(do_execute_no_params, _MARKER, True)
    return do_execute_no_params


def _wrap_connect(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def connect(self: Any, *cargs: Any, **cparams: Any) -> Any:
        if not ACTIVE:
            return original(self, *cargs, **cparams)
        start = _perf_ns()
        connection = original(self, *cargs, **cparams)
        elapsed = _perf_ns() - start
        for observer in ACTIVE:
            observer.connected(connection, elapsed)
        return connection

    setattr(connect, _MARKER, True)
    return connect


_FACTORIES: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "do_execute": _wrap_with_parameters,
    "do_executemany": _wrap_with_parameters,
    "do_execute_no_params": _wrap_do_execute_no_params,
    "connect": _wrap_connect,
}
_lock = threading.Lock()
# (defining class, method name) -> its wrapper, while in place.
_wrapped: dict[tuple[type[Any], str], SharedWrappers[object]] = {}
_IN_PLACE = object()  # the one "source" of every SharedWrappers here: ACTIVE tells who listens


def join(observer: DialectObserver) -> None:
    """Start telling *observer* about statements and connections (the first observer wraps
    ``DefaultDialect``)."""
    with _lock:
        if observer in ACTIVE:
            return
        ACTIVE.append(observer)
        _cover(DefaultDialect)


def leave(observer: DialectObserver) -> None:
    """Stop telling *observer*; the last one to leave restores every wrapped method."""
    with _lock:
        if observer not in ACTIVE:
            return
        ACTIVE.remove(observer)
        if not ACTIVE:
            for wrappers in _wrapped.values():
                wrappers.leave(_IN_PLACE)
            _wrapped.clear()


def cover(dialect_class: type[Any]) -> None:
    """Make sure the statements and connections of *dialect_class* are seen (an engine of it
    was found)."""
    if all(getattr(getattr(dialect_class, n, None), _MARKER, False) for n in WRAPPED_METHODS):
        return  # the usual case: nothing overridden, DefaultDialect's wrappers apply
    with _lock:
        if ACTIVE:
            _cover(dialect_class)


def _cover(dialect_class: type[Any]) -> None:
    """Wrap each method where *dialect_class* finds it, unless already ours."""
    for name in WRAPPED_METHODS:
        found = getattr(dialect_class, name, None)
        if found is None or getattr(found, _MARKER, False):
            continue
        owner = next((k for k in dialect_class.__mro__ if name in k.__dict__), None)
        if owner is None:
            continue
        wrappers = _wrapped[owner, name] = SharedWrappers(owner, {name: _FACTORIES[name]})
        wrappers.join(_IN_PLACE)
