"""aiohttp client: request, connection-pool and DNS metrics, and ClientSession life-cycle findings.

Two independent parts:

* :meth:`AiohttpSource.trace_config` returns an ``aiohttp.TraceConfig`` (aiohttp's public tracing
  API) that records ``http_client_request_duration_seconds``, the time requests queue for a free
  slot of a ``TCPConnector(limit=...)`` (``http_client_connection_wait_time_seconds``),
  connections created vs reused and DNS cache hits vs misses. Only sessions given the trace
  config are measured.
* ClientSession life-cycle findings need to see *every* session, including those created
  without the trace config, so the source wraps ``ClientSession.__init__``, ``close`` and
  ``__del__`` (``functools.wraps``, originals kept and restored on uninstall; one patch shared
  by every installed source). Creating a session costs one short frame walk (code objects and
  instruction offsets only; source locations are built only when a finding fires) and one
  small record, about 4 µs in all:

  - ``client_session_per_request``: a session created and closed by the same HTTP request;
  - ``client_session_unclosed``: a session still open at application shutdown (checked on the
    shutting-down loop) or garbage-collected without being closed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import CodeType, FrameType, SimpleNamespace
from typing import Any, ClassVar

import aiohttp
from yarl import URL

from asyncsentinel.config import Settings
from asyncsentinel.context import RequestState, current_request
from asyncsentinel.findings import (
    CLIENT_SESSION_PER_REQUEST,
    CLIENT_SESSION_UNCLOSED,
    Dispatcher,
    EvidenceValue,
    Finding,
)
from asyncsentinel.frames import Location, user_culprit
from asyncsentinel.instruments import (
    HTTP_CLIENT_CONNECTION_WAIT_TIME,
    HTTP_CLIENT_CONNECTIONS,
    HTTP_CLIENT_DNS_CACHE,
    HTTP_CLIENT_REQUEST_DURATION,
)
from asyncsentinel.sources import Source

MAX_SERVER_ADDRESSES = 100
"""Distinct ``server_address`` label values per source; later hosts share ``OVERFLOW_ADDRESS``."""
OVERFLOW_ADDRESS = "__overflow__"
"""The ``server_address`` of every host seen after the first :data:`MAX_SERVER_ADDRESSES`."""
_MAX_TRACKED_SESSIONS = 10_000  # live sessions with a record; bounds memory if an app leaks them
_STACK_LIMIT = 64
# HTTP methods are a label: anything else is folded into "_OTHER" as the conventions say.
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)
_COMPONENT = "source.aiohttp"

RawStack = tuple[tuple[CodeType, int], ...]


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


def _raw_stack(frame: FrameType | None) -> RawStack:
    """Code objects and instruction offsets from *frame* outwards, outermost first.

    Cheap (no line-number lookup, no frame or local kept alive); :func:`_locations` turns it
    into source locations when a finding fires.
    """
    out: list[tuple[CodeType, int]] = []
    while frame is not None and len(out) < _STACK_LIMIT:
        out.append((frame.f_code, frame.f_lasti))
        frame = frame.f_back
    out.reverse()
    return tuple(out)


def _line_of(code: CodeType, offset: int) -> int:
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line or code.co_firstlineno
    return code.co_firstlineno


def _locations(raw: RawStack) -> tuple[Location, ...]:
    return tuple(
        Location(code.co_filename, _line_of(code, offset), code.co_qualname) for code, offset in raw
    )


class _SessionRecord:
    """What a source remembers about one live ClientSession."""

    __slots__ = ("closed", "created_ns", "loop", "raw_stack", "reported", "request", "session")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        raw_stack: RawStack,
        loop: asyncio.AbstractEventLoop | None,
        request: RequestState | None,
    ) -> None:
        self.session = weakref.ref(session)
        self.raw_stack = raw_stack
        self.loop = loop
        self.request = request
        self.created_ns = time.perf_counter_ns()
        self.closed = False  # close() was called
        self.reported = False  # a client_session_unclosed finding was emitted for it

    def age_seconds(self) -> float:
        return round((time.perf_counter_ns() - self.created_ns) / 1e9, 6)


# --- the ClientSession patch, shared by every installed source ------------------------------------
_patch_lock = threading.Lock()
_observers: list[AiohttpSource] = []
_originals: dict[str, Any] = {}  # attribute name -> original (absent: not patched)
_wrappers: dict[str, Any] = {}


def _wrap_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        observers = _observers
        if observers:
            # One walk shared by all observers; sys._getframe(1) is whoever built the session.
            raw = _raw_stack(sys._getframe(1))
            for source in tuple(observers):
                source._session_created(self, raw)

    return __init__


def _wrap_close(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def close(self: aiohttp.ClientSession) -> None:
        for source in tuple(_observers):
            source._session_closing(self)
        await original(self)

    return close


def _wrap_del(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __del__(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        for source in tuple(_observers):
            source._session_collected(self)
        original(self, *args, **kwargs)

    return __del__


_WRAPPER_FACTORIES: dict[str, Callable[[Any], Any]] = {
    "__init__": _wrap_init,
    "close": _wrap_close,
    "__del__": _wrap_del,
}


def _add_observer(source: AiohttpSource) -> None:
    with _patch_lock:
        if not _observers:
            cls = aiohttp.ClientSession
            for name, factory in _WRAPPER_FACTORIES.items():
                original = cls.__dict__[name]
                _originals[name] = original
                _wrappers[name] = wrapper = factory(original)
                setattr(cls, name, wrapper)
        _observers.append(source)


def _remove_observer(source: AiohttpSource) -> None:
    with _patch_lock:
        if source not in _observers:
            return
        _observers.remove(source)
        if _observers:
            return
        cls = aiohttp.ClientSession
        for name, original in _originals.items():
            # Someone wrapped after us: leave their wrapper in place; ours is now a pass-through.
            if cls.__dict__.get(name) is _wrappers[name]:
                setattr(cls, name, original)
        _originals.clear()
        _wrappers.clear()


class AiohttpSource(Source):
    """Observes aiohttp clients: metrics via :meth:`trace_config`, session life-cycle findings."""

    name: ClassVar[str] = "aiohttp"

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        super().__init__(settings, dispatcher)
        self._server_address = ServerAddresses()
        self._live: dict[int, _SessionRecord] = {}  # id(session) -> record
        # Sessions found unclosed by the garbage collector (and errors met there), reported
        # later from the loop: a finalizer can run in the middle of any code, including a sink
        # or the dispatcher holding a lock.
        self._collected: collections.deque[tuple[_SessionRecord, float]] = collections.deque()
        self._collector_errors: collections.deque[Exception] = collections.deque()
        self._installed = False

    # --- life cycle -------------------------------------------------------------------------------
    def install(self) -> None:
        """Start observing ClientSession creation, closing and collection."""
        if not self._installed:
            _add_observer(self)
            self._installed = True

    def uninstall(self) -> None:
        """Stop observing sessions and restore ``ClientSession`` once no source needs it."""
        if self._installed:
            _remove_observer(self)
            self._installed = False
        self._report_collected()
        self._live.clear()

    async def stop(self) -> None:
        """At application shutdown, report sessions of this loop that are still open."""
        self._report_collected()
        loop = asyncio.get_running_loop()
        for record in tuple(self._live.copy().values()):
            session = record.session()
            if session is None or record.reported or record.loop is not loop:
                continue
            if session.closed:
                continue
            record.reported = True
            self._report_unclosed(record, record.age_seconds(), at_shutdown=True)

    # --- the trace config ------------------------------------------------------------------------
    def trace_config(self) -> aiohttp.TraceConfig:
        """A new ``aiohttp.TraceConfig`` recording request, connection and DNS metrics.

        Pass it to ``ClientSession(trace_configs=[...])``. Request duration runs from the
        request start to the response headers (each redirect hop is one request); requests that
        fail have an empty ``http_response_status_code``.
        """
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
            self.dispatcher.report_error(_COMPONENT, exc)

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
            self.dispatcher.report_error(_COMPONENT, exc)

    async def _on_request_end(
        self, _s: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        try:
            self._request_done(ctx, params.method, params.url.host, str(params.response.status))
        except Exception as exc:
            self.dispatcher.report_error(_COMPONENT, exc)

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
            self.dispatcher.report_error(_COMPONENT, exc)

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
            self.dispatcher.report_error(_COMPONENT, exc)

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

    # --- session life cycle (called by the ClientSession patch; never raise) ----------------------
    def _session_created(self, session: aiohttp.ClientSession, raw: RawStack) -> None:
        try:
            if self._collected or self._collector_errors:
                self._report_collected()
            if len(self._live) >= _MAX_TRACKED_SESSIONS:
                return
            loop = getattr(session, "_loop", None)
            self._live[id(session)] = _SessionRecord(session, raw, loop, current_request())
        except Exception as exc:
            self.dispatcher.report_error(_COMPONENT, exc)

    def _session_closing(self, session: aiohttp.ClientSession) -> None:
        try:
            record = self._live.get(id(session))
            if record is None or record.session() is not session or record.closed:
                return
            record.closed = True
            request = record.request
            if request is None or current_request() is not request:
                return
            stack = _locations(record.raw_stack)
            evidence: dict[str, EvidenceValue] = {"session_lifetime_seconds": record.age_seconds()}
            self.dispatcher.emit(
                Finding.create(
                    CLIENT_SESSION_PER_REQUEST,
                    "aiohttp.ClientSession created and closed within one request: each session "
                    "has its own connection pool and DNS cache, so every request pays new TCP "
                    "(and TLS) handshakes and nothing is reused. Create one ClientSession per "
                    "application in the lifespan and share it.",
                    culprit=user_culprit(stack),
                    stack=stack,
                    evidence=evidence,
                    request=request,
                )
            )
        except Exception as exc:
            self.dispatcher.report_error(_COMPONENT, exc)

    def _session_collected(self, session: aiohttp.ClientSession) -> None:
        # Runs inside the garbage collector: only bookkeeping here, the finding is emitted
        # later by _report_collected on the session's loop (or at stop/uninstall).
        try:
            record = self._live.pop(id(session), None)
            if record is None or record.reported or session.closed:
                return
            record.reported = True
            self._collected.append((record, record.age_seconds()))
            loop = record.loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._report_collected)
        except Exception as exc:
            self._collector_errors.append(exc)

    def _report_collected(self) -> None:
        while self._collector_errors:
            self.dispatcher.report_error(_COMPONENT, self._collector_errors.popleft())
        while True:
            try:
                record, age = self._collected.popleft()
            except IndexError:
                return
            try:
                self._report_unclosed(record, age, at_shutdown=False)
            except Exception as exc:
                self.dispatcher.report_error(_COMPONENT, exc)

    def _report_unclosed(self, record: _SessionRecord, age: float, *, at_shutdown: bool) -> None:
        stack = _locations(record.raw_stack)
        if at_shutdown:
            message = (
                "aiohttp.ClientSession still open at application shutdown: its connections are "
                "dropped instead of closed. Close it in the lifespan's shutdown "
                "(await session.close()) or use 'async with ClientSession()'."
            )
        else:
            message = (
                "aiohttp.ClientSession garbage-collected without being closed: its connections "
                "stayed open until the collector found it. Use 'async with ClientSession()' "
                "or create one session in the lifespan and close it at shutdown."
            )
        evidence: dict[str, EvidenceValue] = {
            "detected_at": "shutdown" if at_shutdown else "garbage_collection",
            "session_age_seconds": age,
        }
        self.dispatcher.emit(
            Finding.create(
                CLIENT_SESSION_UNCLOSED,
                message,
                culprit=user_culprit(stack),
                stack=stack,
                evidence=evidence,
                request=record.request,
            )
        )
