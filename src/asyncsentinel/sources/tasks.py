"""Task tracking: live tasks, leaked fire-and-forget tasks, swallowed cancellation, lost errors.

Installed without any change to how the application creates tasks:

* a **task factory** on the application's loop, chained with the one already set (for example
  ``asyncio.eager_task_factory``) and restored on shutdown. For each task it adds one done
  callback, and for tasks created by user code during a request it records a weak reference and
  the creating line (a walk of a few frames, no ``traceback`` call) in the request's record;
* ``task_leaked``: ``task_leak_seconds`` after a request finished (handler and background tasks
  returned), the tasks it created that are still not done are reported, by creating line.
  Tasks that a library created (a connection pool's reaper, an HTTP client's resolver) are its
  own business and are not tracked;
* ``cancellation_swallowed``: in the done callback, ``not task.cancelled() and
  task.cancelling() > 0``: the task was asked to cancel and returned normally. ``asyncio.timeout``
  and ``TaskGroup`` call ``uncancel()``, so correct code never matches. The callback never calls
  ``task.exception()``, which would mark the exception retrieved and silence asyncio's warning;
* ``task_exception_unretrieved``: through the loop's exception handler, chained so the previous
  (the user's, or asyncio's default) handler still runs for every event.

Switch: ``task_tracking`` (``ASYNCSENTINEL_TASK_TRACKING=false``).
"""

from __future__ import annotations

import asyncio
import functools
import sys
import weakref
from asyncio import current_task
from collections.abc import Callable
from types import FrameType
from typing import Any

from asyncsentinel.config import Settings
from asyncsentinel.context import RequestState, _current, current_request
from asyncsentinel.findings import (
    CANCELLATION_SWALLOWED,
    TASK_EXCEPTION_UNRETRIEVED,
    TASK_LEAKED,
    Dispatcher,
    Finding,
)
from asyncsentinel.frames import Location, is_user_code, user_culprit
from asyncsentinel.instruments import ASYNCIO_TASKS
from asyncsentinel.sources import Source
from asyncsentinel.sources._task_requests import (
    EXTRAS_KEY,
    HAS_TASK_CONTEXT,
    RequestTasks,
    request_of_task,
)
from asyncsentinel.sources.task_sites import (
    awaiting_location,
    coroutine_location,
    creation_site,
    site_location,
    traceback_stack,
)

TaskFactory = Callable[..., "asyncio.Future[Any]"]
ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]

_MAX_TASKS_PER_REQUEST = 1000
_GAUGE_INTERVAL = 1.0  # seconds between updates of the live-task gauge

_TASKGROUP_UNCANCEL_BUG = sys.version_info < (3, 13)
_TASKGROUP_CREATE = asyncio.TaskGroup.create_task.__code__


class TaskSource(Source):
    """Tracks asyncio tasks on the application's loop (see the module docstring)."""

    name = "tasks"

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        super().__init__(settings, dispatcher)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_factory: TaskFactory | None = None
        self._previous_handler: ExceptionHandler | None = None
        self._live = 0
        self._gauge_handle: asyncio.TimerHandle | None = None
        self._leak_checks: dict[RequestState, asyncio.TimerHandle] = {}
        # Python 3.11 only (no Task.get_context()): request of tasks that ended with an
        # exception, so a later "never retrieved" event can still name the request.
        self._errored: weakref.WeakKeyDictionary[asyncio.Future[Any], RequestState] = (
            weakref.WeakKeyDictionary()
        )
        self._taskgroup_hosts: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()
        self._done_callback = self._done  # one bound method, not one per task

    # --- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop is not None:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._previous_factory = loop.get_task_factory()
        loop.set_task_factory(self._factory)
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._exception_handler)
        # Tasks that exist already are counted too, and leave the count when they end.
        self._live = 0
        for task in asyncio.all_tasks(loop):
            self._live += 1
            task.add_done_callback(self._left)
        self._update_gauge()

    async def stop(self) -> None:
        self._restore()

    def uninstall(self) -> None:
        self._restore()

    def _restore(self) -> None:
        """Put back the previous task factory and exception handler (if still ours)."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        # Bound methods compare equal when they wrap the same function and instance. If
        # someone replaced ours meanwhile, theirs stays; ours is inert once _loop is None.
        if loop.get_task_factory() == self._factory:
            loop.set_task_factory(self._previous_factory)
        if loop.get_exception_handler() == self._exception_handler:
            loop.set_exception_handler(self._previous_handler)
        handles = [self._gauge_handle, *self._leak_checks.values()]
        self._gauge_handle = None
        self._leak_checks.clear()

        def cancel_all() -> None:
            for handle in handles:
                if handle is not None:
                    handle.cancel()

        on_loop_thread(loop, cancel_all)

    # --- per task (the hot path: keep it to a few attribute reads) -----------------------------
    def _factory(
        self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        previous = self._previous_factory
        if previous is not None:
            task = previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        if self._loop is None:
            return task  # stopped, but still chained by someone: stay out of the way
        try:
            self._live += 1
            # Runs in a copy of the creator's context, so current_request() works there.
            task.add_done_callback(self._done_callback)
            caller = sys._getframe(1)  # loop.create_task (asyncio) or its caller (uvloop)
            if _TASKGROUP_UNCANCEL_BUG and (
                caller.f_code is _TASKGROUP_CREATE or sys._getframe(2).f_code is _TASKGROUP_CREATE
            ):
                task.add_done_callback(
                    functools.partial(self._taskgroup_child_done, current_task())
                )
            context = kwargs.get("context")
            state = _current.get() if context is None else context.get(_current)
            if state is not None and not state.finished:
                self._track(state, task, caller)
        except Exception as exc:
            self.dispatcher.report_error("source.tasks", exc)
        return task

    def _track(self, state: RequestState, task: asyncio.Future[Any], caller: FrameType) -> None:
        """Remember a task the request's own code created, with the creating line."""
        site = creation_site(caller)
        if site is None or not isinstance(task, asyncio.Task):
            return
        record: RequestTasks | None = state.extras.get(EXTRAS_KEY)
        if record is None:
            record = state.extras[EXTRAS_KEY] = RequestTasks(_MAX_TASKS_PER_REQUEST)
        record.add(task, site)

    def _left(self, task: asyncio.Future[Any]) -> None:
        self._live -= 1

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._live -= 1
        try:
            cancelling = task.cancelling()  # type: ignore[attr-defined]
        except AttributeError:  # a Future-like object from another task factory
            return
        if self._loop is None or task.cancelled():
            return
        try:
            if (
                cancelling > 0
                and task not in self._taskgroup_hosts
                and (culprit := coroutine_location(task)) is not None
                # A library's coroutine (the server's request task, anyio's wrappers) manages
                # its own cancellation; only the application's coroutines are judged.
                and is_user_code(culprit.filename)
            ):
                self._report_swallowed(task, cancelling, culprit)
            if not HAS_TASK_CONTEXT and getattr(task, "_exception", None) is not None:
                # Reads the attribute, not task.exception(): the error stays "unretrieved".
                state = current_request()
                if state is not None:
                    self._errored[task] = state
        except Exception as exc:
            self.dispatcher.report_error("source.tasks", exc)

    def _taskgroup_child_done(
        self, parent: asyncio.Task[Any] | None, task: asyncio.Future[Any]
    ) -> None:
        # Python < 3.13: when a TaskGroup child fails while the parent waits in __aexit__, the
        # group cancels the parent and never calls uncancel() (CPython gh-116720), so the
        # parent ends "cancelling" through no fault of its own: don't judge it.
        if parent is not None and not task.cancelled() and getattr(task, "_exception", None):
            self._taskgroup_hosts.add(parent)

    def _update_gauge(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            self.dispatcher.set(ASYNCIO_TASKS, self._live)
            self._rechain(loop)
        except Exception as exc:
            self.dispatcher.report_error("source.tasks", exc)
        self._gauge_handle = loop.call_later(_GAUGE_INTERVAL, self._update_gauge)

    def _rechain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Get back in front if the application replaced our factory or handler.

        Our start-up runs before the application's own lifespan code, which may set its own
        task factory or exception handler (Sentry, eager_task_factory); theirs becomes the one
        we chain to, so both keep working.
        """
        factory = loop.get_task_factory()
        if not _chain_contains(factory, self, "_previous_factory"):
            self._previous_factory = factory
            loop.set_task_factory(self._factory)
        handler = loop.get_exception_handler()
        if not _chain_contains(handler, self, "_previous_handler"):
            self._previous_handler = handler
            loop.set_exception_handler(self._exception_handler)

    # --- findings -------------------------------------------------------------------------------
    def _report_swallowed(
        self, task: asyncio.Future[Any], requests: int, culprit: Location
    ) -> None:
        name = task.get_name() if isinstance(task, asyncio.Task) else type(task).__name__
        self.dispatcher.emit(
            Finding.create(
                CANCELLATION_SWALLOWED,
                f"task {name!r} was asked to cancel ({requests} pending cancel request(s)) but "
                f"its coroutine returned normally instead of raising CancelledError; whoever "
                f"cancelled it (asyncio.timeout, a TaskGroup, shutdown) now waits or misbehaves. "
                f"Re-raise CancelledError after cleanup ('except CancelledError: ...; raise')",
                culprit=culprit,
                stack=(culprit,),
                evidence={"task": name, "cancel_requests": requests},
            )
        )

    def request_finished(self, state: RequestState) -> None:
        record: RequestTasks | None = state.extras.get(EXTRAS_KEY)
        loop = self._loop
        if record is None or loop is None or not record.created:
            return
        for ref, _ in record.created:
            task = ref()
            if task is not None and not task.done():
                self._leak_checks[state] = loop.call_later(
                    self.settings.task_leak_seconds, self._check_leaks, state
                )
                return
        state.extras.pop(EXTRAS_KEY, None)  # everything it started has ended: nothing to check

    def _check_leaks(self, state: RequestState) -> None:
        self._leak_checks.pop(state, None)
        try:
            record: RequestTasks | None = state.extras.pop(EXTRAS_KEY, None)
            if record is None:
                return
            by_site: dict[Location, list[asyncio.Task[Any]]] = {}
            api: dict[Location, str] = {}
            for ref, site in record.created:
                task = ref()
                if task is None or task.done():
                    continue
                culprit = site_location(site)
                by_site.setdefault(culprit, []).append(task)
                api[culprit] = site[2].co_qualname if site[2] is not None else ""
            for culprit, tasks in by_site.items():
                self._report_leak(state, culprit, api[culprit], tasks)
        except Exception as exc:
            self.dispatcher.report_error("source.tasks", exc)

    def _report_leak(
        self,
        state: RequestState,
        culprit: Location,
        created_with: str,
        tasks: list[asyncio.Task[Any]],
    ) -> None:
        first = tasks[0]
        evidence: dict[str, str | int | float | bool] = {
            "tasks": len(tasks),
            "task": first.get_name(),
            "leak_seconds": self.settings.task_leak_seconds,
        }
        if created_with:
            evidence["created_with"] = created_with
        coro = coroutine_location(first)
        if coro is not None:
            evidence["coroutine"] = coro.function
        waiting = awaiting_location(first)
        if waiting is not None:
            evidence["awaiting_at"] = str(waiting)
        count = f"{len(tasks)} tasks" if len(tasks) > 1 else f"task {first.get_name()!r}"
        self.dispatcher.emit(
            Finding.create(
                TASK_LEAKED,
                f"{count} created here while handling the request was still running "
                f"{self.settings.task_leak_seconds:g} s after the response finished "
                f"(fire-and-forget): nothing awaits it, its errors are lost and it may be "
                f"garbage-collected mid-flight. Await it, run it in a TaskGroup, or hand it to "
                f"a worker owned by the application's lifespan",
                culprit=culprit,
                stack=(culprit,),
                evidence=evidence,
                request=state,
            )
        )

    # --- the loop's exception handler -------------------------------------------------------------
    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if self._loop is not None:
            try:
                self._maybe_report_unretrieved(context)
            except Exception as exc:
                self.dispatcher.report_error("source.tasks", exc)
        previous = self._previous_handler
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _maybe_report_unretrieved(self, context: dict[str, Any]) -> None:
        future = context.get("future")
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if (
            not isinstance(future, asyncio.Future)
            or not isinstance(exc, BaseException)
            or not message.endswith("exception was never retrieved")
        ):
            return
        stack = traceback_stack(exc.__traceback__)
        culprit = user_culprit(stack) or coroutine_location(future)
        name = future.get_name() if isinstance(future, asyncio.Task) else type(future).__name__
        state = request_of_task(future) or self._errored.pop(future, None)
        self.dispatcher.emit(
            Finding.create(
                TASK_EXCEPTION_UNRETRIEVED,
                f"{type(exc).__qualname__} raised in task {name!r} was never retrieved: nothing "
                f"awaited the task or called .result()/.exception(), so the error was lost until "
                f"garbage collection. Await the task (or use a TaskGroup) and handle the error",
                culprit=culprit,
                stack=stack,
                evidence={"exception_type": type(exc).__qualname__, "task": name},
                request=state,
            )
        )


def on_loop_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    """Run *fn* on *loop*'s thread (now, if this is it or the loop is not running)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop or not loop.is_running():
        fn()
        return
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # closed meanwhile
        fn()


def _chain_contains(hook: object, source: TaskSource, previous_attr: str) -> bool:
    """True when *source* is *hook* or is reached by following chained TaskSource hooks.

    Prevents two sentinels on one loop from chaining to each other in a circle.
    """
    for _ in range(32):
        owner = getattr(hook, "__self__", None)
        if not isinstance(owner, TaskSource):
            return False
        if owner is source:
            return True
        hook = getattr(owner, previous_attr)
    return True
