"""aiohttp client: request, connection-pool and DNS metrics, and ClientSession life-cycle findings.

Two independent parts:

* :meth:`AiohttpSource.trace_config` returns an ``aiohttp.TraceConfig`` (aiohttp's public tracing
  API) recording the HTTP client metrics (see :mod:`.aiohttp_metrics`). Only sessions given the
  trace config are measured.
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
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar

import aiohttp

from asyncsentinel.config import Settings
from asyncsentinel.context import RequestState, current_request
from asyncsentinel.findings import (
    CLIENT_SESSION_PER_REQUEST,
    CLIENT_SESSION_UNCLOSED,
    Dispatcher,
    EvidenceValue,
    Finding,
)
from asyncsentinel.frames import Origin, origins_to_stack, user_culprit
from asyncsentinel.sources import Source
from asyncsentinel.sources._shared_wrappers import SharedWrappers
from asyncsentinel.sources.aiohttp_metrics import COMPONENT, ClientMetrics

_MAX_TRACKED_SESSIONS = 10_000  # live sessions with a record; bounds memory if an app leaks them
_STACK_LIMIT = 64

RawStack = tuple[Origin, ...]


def _raw_stack(frame: FrameType | None) -> RawStack:
    """Code objects and instruction offsets from *frame* outwards, innermost first.

    Cheap (no line-number lookup, no frame or local kept alive);
    :func:`~asyncsentinel.frames.origins_to_stack` turns it into source locations when a
    finding fires.
    """
    out: list[Origin] = []
    while frame is not None and len(out) < _STACK_LIMIT:
        out.append((frame.f_code, frame.f_lasti))
        frame = frame.f_back
    return tuple(out)


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


_SESSION_WRAPPERS: SharedWrappers[AiohttpSource] = SharedWrappers(
    aiohttp.ClientSession, {"__init__": _wrap_init, "close": _wrap_close, "__del__": _wrap_del}
)
_observers = _SESSION_WRAPPERS.active  # a module global: read by every wrapper call


class AiohttpSource(Source):
    """Observes aiohttp clients: metrics via :meth:`trace_config`, session life-cycle findings."""

    name: ClassVar[str] = "aiohttp"

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        super().__init__(settings, dispatcher)
        self._metrics = ClientMetrics(dispatcher)
        self._live: dict[int, _SessionRecord] = {}  # id(session) -> record
        # Sessions found unclosed by the garbage collector (and errors met there), reported
        # later from the loop: a finalizer can run in the middle of any code, including a sink
        # or the dispatcher holding a lock.
        self._collected: collections.deque[tuple[_SessionRecord, float]] = collections.deque()
        self._collector_errors: collections.deque[Exception] = collections.deque()

    # --- life cycle -------------------------------------------------------------------------------
    def install(self) -> None:
        """Start observing ClientSession creation, closing and collection."""
        _SESSION_WRAPPERS.join(self)

    def uninstall(self) -> None:
        """Stop observing sessions and restore ``ClientSession`` once no source needs it."""
        _SESSION_WRAPPERS.leave(self)
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

    def trace_config(self) -> aiohttp.TraceConfig:
        """A new ``aiohttp.TraceConfig`` recording request, connection and DNS metrics.

        Pass it to ``ClientSession(trace_configs=[...])``. Request duration runs from the
        request start to the response headers (each redirect hop is one request); requests that
        fail have an empty ``http_response_status_code``.
        """
        return self._metrics.trace_config()

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
            self.dispatcher.report_error(COMPONENT, exc)

    def _session_closing(self, session: aiohttp.ClientSession) -> None:
        try:
            record = self._live.get(id(session))
            if record is None or record.session() is not session or record.closed:
                return
            record.closed = True
            request = record.request
            if request is None or current_request() is not request:
                return
            stack = origins_to_stack(record.raw_stack)
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
            self.dispatcher.report_error(COMPONENT, exc)

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
            self.dispatcher.report_error(COMPONENT, self._collector_errors.popleft())
        while True:
            try:
                record, age = self._collected.popleft()
            except IndexError:
                return
            try:
                self._report_unclosed(record, age, at_shutdown=False)
            except Exception as exc:
                self.dispatcher.report_error(COMPONENT, exc)

    def _report_unclosed(self, record: _SessionRecord, age: float, *, at_shutdown: bool) -> None:
        stack = origins_to_stack(record.raw_stack)
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
