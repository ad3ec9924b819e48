"""The request context: which request the current code is working for.

The middleware puts a :class:`RequestState` in a context variable for the duration of each HTTP
request. Context variables are copied into tasks created by the handler, so work started by the
request (including fire-and-forget tasks) is still attributed to it. Detectors keep their own
per-request data in :attr:`RequestState.extras` under their name, created lazily.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

UNMATCHED_ROUTE = "__unmatched__"
"""The ``http_route`` of requests no route matched (404s, scanners): one value for all."""
OVERFLOW_ROUTE = "__overflow__"
"""The ``http_route`` used once :attr:`Settings.max_routes` distinct templates have been seen."""


@dataclass(slots=True, eq=False)
class RequestState:
    """What asyncsentinel knows about one in-flight HTTP request.

    Holds no raw path, query string, header or body: only the route template, the method and
    counters, so nothing user-supplied can reach a metric label or a log line through it.
    """

    method: str
    scope: MutableMapping[str, Any] = field(repr=False)
    resolve_route: Callable[[MutableMapping[str, Any]], str] = field(repr=False)
    start_ns: int = field(default_factory=time.perf_counter_ns)
    span: Any = field(default=None, repr=False)
    """The OpenTelemetry span of this request, when one was active or created."""
    status_code: int = 0
    response_end_ns: int = 0
    finished: bool = False
    span_attributes: dict[str, str | int | float | bool] = field(default_factory=dict)
    """Attributes detectors want on the request span (e.g. ``asyncsentinel.db.query_count``)."""
    extras: dict[str, Any] = field(default_factory=dict, repr=False)
    db: Any = field(default=None, repr=False)
    """The database sources' record of this request (created at its first statement or
    checkout): a slot rather than an :attr:`extras` entry, because every SQL statement reads it."""
    _route: str | None = field(default=None, repr=False)

    @property
    def route(self) -> str:
        """The route template (``/users/{user_id}``), resolved once routing has happened."""
        if self._route is not None:
            return self._route
        route = self.resolve_route(self.scope)
        if self.finished or "route" in self.scope:
            self._route = route  # stable from here on; before routing it may still change
        return route

    def freeze(self) -> None:
        """Mark the request finished and pin its route; drop the scope to bound memory."""
        self.finished = True
        if self._route is None:
            self._route = self.resolve_route(self.scope)
        self.scope = {}


_current: ContextVar[RequestState | None] = ContextVar("asyncsentinel_request", default=None)
current_request_var = _current
"""The context variable behind :func:`current_request`: ``current_request_var.get()`` is the same
without a function call, for paths that run for every SQL statement."""


def current_request() -> RequestState | None:
    """The request the running code works for, or ``None`` outside any request."""
    return _current.get()


def enter_request(state: RequestState | None) -> Any:
    """Make *state* the current request; returns a token for :func:`exit_request`."""
    return _current.set(state)


def exit_request(token: Any) -> None:
    """Undo :func:`enter_request`."""
    _current.reset(token)
