"""The pure-ASGI middleware: request metrics, request context, lifespan hooks, ``/metrics``.

It never reads or buffers a body and never changes a message: it only watches
``http.response.start`` (for the status) and the last ``http.response.body`` (for the duration),
so streaming responses, background tasks, client disconnects and exceptions behave exactly as
without it. Any error of asyncsentinel's own is contained by the :class:`Sentinel`.
"""

from __future__ import annotations

import threading
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asyncsentinel.context import OVERFLOW_ROUTE, UNMATCHED_ROUTE, enter_request, exit_request

if TYPE_CHECKING:
    from asyncsentinel.sentinel import Sentinel


class SentinelMiddleware:
    """Pure ASGI middleware that feeds a :class:`~asyncsentinel.Sentinel`.

    Usable directly, Starlette-style::

        sentinel = Sentinel()
        app.add_middleware(SentinelMiddleware, sentinel=sentinel)

    :func:`asyncsentinel.instrument` does this (and more) in one call.
    """

    def __init__(self, app: ASGIApp, *, sentinel: Sentinel) -> None:
        self.app = app
        self.sentinel = sentinel
        self._metrics_path = sentinel.settings.metrics_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            if self._metrics_path is not None and scope.get("path") == self._metrics_path:
                await self._serve_metrics(scope, send)
                return
            await self._http(scope, receive, send)
        elif scope_type == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        sentinel = self.sentinel
        if not sentinel.started:
            await sentinel.startup()  # servers run without lifespan, e.g. lifespan="off"
        state = sentinel.begin_request(scope)
        if state is None:  # asyncsentinel failed internally: stay out of the way
            await self.app(scope, receive, send)
            return

        async def send_watching(message: Message) -> None:
            message_type = message["type"]
            if message_type == "http.response.start":
                state.status_code = message["status"]
            elif message_type == "http.response.body" and not message.get("more_body", False):
                state.response_end_ns = sentinel.clock()
            await send(message)

        token = enter_request(state)
        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_watching)
        except BaseException as exc:
            error = exc
            raise
        finally:
            exit_request(token)
            sentinel.end_request(state, error)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        sentinel = self.sentinel

        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await sentinel.startup()
            return message

        async def send_watching(message: Message) -> None:
            # The application's own shutdown code has run (it disposes its engines and pools);
            # asyncsentinel's shutdown checks run now, before the server is told it may exit.
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await sentinel.shutdown()
            await send(message)

        await self.app(scope, receive_watching, send_watching)

    async def _serve_metrics(self, scope: Scope, send: Send) -> None:
        accept = ""
        for name, value in scope.get("headers", ()):
            if name == b"accept":
                accept = value.decode("latin-1")
        body, content_type = self.sentinel.render_metrics(accept)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode("latin-1")),
                    (b"content-length", str(len(body)).encode("latin-1")),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body}
        )


class RouteTemplates:
    """Resolves a request's ``http_route``: the matched route's template, bounded in number.

    Starlette and FastAPI store the matched route in ``scope["route"]``; with ``Mount`` the prefix
    the request went through is ``root_path`` minus the application's own root path.
    Unmatched requests share :data:`UNMATCHED_ROUTE`; once ``max_routes`` distinct templates
    exist, new ones become :data:`OVERFLOW_ROUTE`.
    """

    def __init__(self, max_routes: int) -> None:
        self._max = max_routes
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, scope: MutableMapping[str, Any]) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            return UNMATCHED_ROUTE
        root = scope.get("root_path", "")
        app_root = scope.get("app_root_path", root)
        if root != app_root and root.startswith(app_root):
            path = root[len(app_root) :] + path
        if path in self._seen:
            return path
        with self._lock:
            if len(self._seen) >= self._max:
                return OVERFLOW_ROUTE
            self._seen.add(path)
        return path
