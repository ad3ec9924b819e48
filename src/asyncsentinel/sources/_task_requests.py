"""Which HTTP request an asyncio task works for, answerable from any thread.

The event-loop watchdog (a thread) must name the request whose task blocked the loop, and the
loop exception handler must name the request of a task that is being garbage-collected.

* Python 3.12+: ``Task.get_context()`` returns the task's context, which holds the request
  context variable; reading a variable of a context is a lock-free lookup in an immutable map.
* Python 3.11 has no such accessor, so the loop source registers the root task of each in-flight
  request (the task the server created to run the ASGI app), and tasks created during a request
  are found in the task source's per-request record (:class:`RequestTasks`).
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from types import CodeType
from typing import Any

from asyncsentinel.context import RequestState, _current

HAS_TASK_CONTEXT = sys.version_info >= (3, 12)

EXTRAS_KEY = "tasks"
"""Key of :class:`RequestTasks` in :attr:`RequestState.extras`."""

CreationSite = tuple[CodeType, int, CodeType | None]
"""Where user code created a task: its code and line, and the runtime function it called."""

# Python 3.11 only: root task of each in-flight request -> its state. Written on the loop
# thread, read by the watchdog thread (single dict operations are atomic under the GIL).
_root_tasks: dict[object, RequestState] = {}


class RequestTasks:
    """Tasks one request created from user code: weak references plus where each was created.

    Bounded: past ``limit`` tasks only :attr:`untracked` grows, so a request that spawns
    thousands of tasks costs a fixed amount of memory.
    """

    __slots__ = ("created", "limit", "untracked")

    def __init__(self, limit: int) -> None:
        self.created: list[tuple[weakref.ref[asyncio.Task[Any]], CreationSite]] = []
        self.limit = limit
        self.untracked = 0

    def add(self, task: asyncio.Task[Any], site: CreationSite) -> None:
        if len(self.created) < self.limit:
            self.created.append((weakref.ref(task), site))
        else:
            self.untracked += 1

    def __contains__(self, task: object) -> bool:
        return any(ref() is task for ref, _ in list(self.created))


def bind_root_task(task: asyncio.Task[Any], state: RequestState) -> None:
    """Python 3.11: remember that *task* runs the ASGI app for *state*."""
    _root_tasks[task] = state


def unbind_root_task(task: asyncio.Task[Any], state: RequestState) -> None:
    """Python 3.11: the request of *task* finished."""
    if _root_tasks.get(task) is state:
        del _root_tasks[task]


def request_of_task(task: asyncio.Future[Any] | None) -> RequestState | None:
    """The request *task* works for, or ``None``; safe to call from any thread."""
    if task is None:
        return None
    get_context = getattr(task, "get_context", None)
    if get_context is not None:  # Python 3.12+
        found: RequestState | None = get_context().get(_current)
        return found
    state = _root_tasks.get(task)
    if state is not None:
        return state
    for candidate in list(_root_tasks.values()):
        record = candidate.extras.get(EXTRAS_KEY)
        if record is not None and task in record:
            return candidate
    return None
