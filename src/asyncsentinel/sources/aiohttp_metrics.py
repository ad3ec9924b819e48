"""aiohttp client metrics through aiohttp's public tracing API (``aiohttp.TraceConfig``).

:meth:`ClientMetrics.trace_config` returns a ``TraceConfig`` that records
``http_client_request_duration_seconds``, the time requests queue for a free slot of a
``TCPConnector(limit=...)`` (``http_client_connection_wait_time_seconds``), connections created
vs reused and DNS cache hits vs misses. Only sessions given the trace config are measured.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import aiohttp
from yarl import URL

from asyncsentinel.findings import Dispatcher
from asyncsentinel.instruments import (
    HTTP_CLIENT_CONNECTION_WAIT_TIME,
    HTTP_CLIENT_CONNECTIONS,
    HTTP_CLIENT_DNS_CACHE,
    HTTP_CLIENT_REQUEST_DURATION,
)

MAX_SERVER_ADDRESSES = 100
"""Distinct ``server_address`` label values per source; later hosts share ``OVERFLOW_ADDRESS``."""
OVERFLOW_ADDRESS = "__overflow__"
"""The ``server_address`` of every host seen after the first :data:`MAX_SERVER_ADDRESSES`."""
# HTTP methods are a label: anything else is folded into "_OTHER" as the conventions say.
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)
COMPONENT = "source.aiohttp"
"""The component the aiohttp source's own errors are counted under (metrics and findings)."""


class ServerAddresses:
    """Bounded ``server_address`` labels: the first *limit* hosts seen keep their name."""

    def __init__(self, limit: int = MAX_SERVER_ADDRESSES) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, host: str | None) -> str:
        host = host or ""
        if host in self._seen:
            return host
        with self._lock:
            if len(self._seen) >= self._limit:
                return OVERFLOW_ADDRESS
            self._seen.add(host)
        return host


class ClientMetrics:
    """The aiohttp client metrics of one source: builds trace configs and records what they see."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._server_address = ServerAddresses()

    def trace_config(self) -> aiohttp.TraceConfig:
        """A new ``aiohttp.TraceConfig`` whose callbacks record into these metrics (what it
        measures: :meth:`asyncsentinel.sources.aiohttp.AiohttpSource.trace_config`)."""
        config = aiohttp.TraceConfig()
        config.on_request_start.append(self._on_request_start)
        config.on_request_redirect.append(self._on_request_redirect)
        config.on_request_end.append(self._on_request_end)
        config.on_request_exception.append(self._on_request_exception)
        config.on_connection_queued_start.append(self._on_connection_queued_start)
        config.on_connection_queued_end.append(self._on_connection_queued_end)
        config.on_connection_create_end.append(self._on_connection_create_end)
        config.on_connection_reuseconn.append(self._on_connection_reuseconn)
        config.on_dns_cache_hit.append(self._on_dns_cache_hit)
        config.on_dns_cache_miss.append(self._on_dns_cache_miss)
        return config

    # Every callback is awaited inside the user's request: each one contains its own errors.
    async def _on_request_start(
        self,
        _s: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        try:
            ctx.start_ns = time.perf_counter_ns()
            ctx.queued_ns = 0
            ctx.server_address = self._server_address(params.url.host)
        except Exception as exc:
            self.dispatcher.report_error(COMPONENT, exc)

    async def _on_request_redirect(
        self,
        _s: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestRedirectParams,
    ) -> None:
        try:
            url: URL = params.url
            self._request_done(ctx, params.method, url.host, str(params.response.status))
            ctx.start_ns = time.perf_counter_ns()
            location = params.response.headers.get("Location") or params.response.headers.get("URI")
            if location:
                # Connection events of the next hop are attributed to the redirect's target.
                ctx.server_address = self._server_address(url.join(URL(location)).host)
        except Exception as exc:
            self.dispatcher.report_error(COMPONENT, exc)

    async def _on_request_end(
        self, _s: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        try:
            self._request_done(ctx, params.method, params.url.host, str(params.response.status))
        except Exception as exc:
            self.dispatcher.report_error(COMPONENT, exc)

    async def _on_request_exception(
        self,
        _s: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        try:
            # A request that gave up while queued for a connection slot is the clearest
            # saturation signal of all: record the wait it suffered.
            self._queue_left(ctx)
            self._request_done(ctx, params.method, params.url.host, "")
        except Exception as exc:
            self.dispatcher.report_error(COMPONENT, exc)

    def _request_done(
        self, ctx: SimpleNamespace, method: str, host: str | None, status: str
    ) -> None:
        start_ns: int = getattr(ctx, "start_ns", 0)
        if not start_ns:
            return
        method = method.upper()
        if method not in _KNOWN_METHODS:
            method = "_OTHER"
        self.dispatcher.record(
            HTTP_CLIENT_REQUEST_DURATION,
            (time.perf_counter_ns() - start_ns) / 1e9,
            (method, self._server_address(host), status),
        )

    async def _on_connection_queued_start(
        self,
        _s: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        _p: aiohttp.TraceConnectionQueuedStartParams,
    ) -> None:
        ctx.queued_ns = time.perf_counter_ns()

    async def _on_connection_queued_end(
        self,
        _s: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        _p: aiohttp.TraceConnectionQueuedEndParams,
    ) -> None:
        try:
            self._queue_left(ctx)
        except Exception as exc:
            self.dispatcher.report_error(COMPONENT, exc)

    def _queue_left(self, ctx: SimpleNamespace) -> None:
        queued_ns: int = getattr(ctx, "queued_ns", 0)
        if queued_ns:
            ctx.queued_ns = 0
            self.dispatcher.record(
                HTTP_CLIENT_CONNECTION_WAIT_TIME,
                (time.perf_counter_ns() - queued_ns) / 1e9,
                (getattr(ctx, "server_address", ""),),
            )

    async def _on_connection_create_end(
        self,
        _s: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        _p: aiohttp.TraceConnectionCreateEndParams,
    ) -> None:
        self.dispatcher.record(
            HTTP_CLIENT_CONNECTIONS, 1, (getattr(ctx, "server_address", ""), "created")
        )

    async def _on_connection_reuseconn(
        self,
        _s: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        _p: aiohttp.TraceConnectionReuseconnParams,
    ) -> None:
        self.dispatcher.record(
            HTTP_CLIENT_CONNECTIONS, 1, (getattr(ctx, "server_address", ""), "reused")
        )

    async def _on_dns_cache_hit(
        self, _s: aiohttp.ClientSession, _c: SimpleNamespace, _p: aiohttp.TraceDnsCacheHitParams
    ) -> None:
        self.dispatcher.record(HTTP_CLIENT_DNS_CACHE, 1, ("hit",))

    async def _on_dns_cache_miss(
        self, _s: aiohttp.ClientSession, _c: SimpleNamespace, _p: aiohttp.TraceDnsCacheMissParams
    ) -> None:
        self.dispatcher.record(HTTP_CLIENT_DNS_CACHE, 1, ("miss",))
