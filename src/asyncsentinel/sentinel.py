"""The :class:`Sentinel` (one configured instance) and :func:`instrument`, the two-line setup."""

from __future__ import annotations

import importlib
import threading
import time
import weakref
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from asyncsentinel.asgi import RouteTemplates, SentinelMiddleware
from asyncsentinel.config import ConfigError, Settings
from asyncsentinel.context import RequestState
from asyncsentinel.exposition import render_metrics
from asyncsentinel.findings import Dispatcher, Finding
from asyncsentinel.instruments import HTTP_SERVER_ACTIVE_REQUESTS, HTTP_SERVER_REQUEST_DURATION
from asyncsentinel.sinks.logs import LogSink
from asyncsentinel.sinks.memory import MemorySink
from asyncsentinel.sinks.otel import OpenTelemetrySink, ServerSpans, current_span, tracer_for
from asyncsentinel.sinks.prometheus import PrometheusSink
from asyncsentinel.sources import Source

# Built-in sources: (setting that switches it on, module, class). Imported only when enabled,
# so an optional library that is missing fails in its own module with a message naming it.
BUILTIN_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("aiohttp", "asyncsentinel.sources.aiohttp", "AiohttpSource"),
    ("sqlalchemy", "asyncsentinel.sources.sqlalchemy", "SQLAlchemySource"),
    ("sqlalchemy", "asyncsentinel.sources.asyncpg", "AsyncpgSource"),
    ("sqlalchemy", "asyncsentinel.sources.sqlalchemy_sessions", "SQLAlchemySessionSource"),
    ("loop_monitor", "asyncsentinel.sources.loop", "LoopSource"),
    ("task_tracking", "asyncsentinel.sources.tasks", "TaskSource"),
    ("thread_pool_metrics", "asyncsentinel.sources.threadpool", "ThreadPoolSource"),
)

# HTTP methods are a label: anything else is folded into "_OTHER" as the conventions say.
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)


class _ActiveRequests:
    """``http_server_active_requests`` by method: levels the sinks read when they report
    (:meth:`Dispatcher.level`), so a request pays for no metric update at its start and end;
    where a sink cannot read levels (multiprocess mode) each change is recorded instead.

    A method's level is the length of a list that each request start appends to and each end
    pops from: both are single, atomic operations, so requests handled in several threads need
    no lock (a lock and a dictionary update per start and end cost ~0.6 µs per request).
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._in_flight: dict[str, list[None]] = {}
        self._lock = threading.Lock()  # only to create a method's list once
        self._record_changes = False

    def started(self, method: str) -> None:
        in_flight = self._in_flight.get(method)
        if in_flight is None:
            in_flight = self._first(method)
        in_flight.append(None)
        if self._record_changes:
            self._dispatcher.record(HTTP_SERVER_ACTIVE_REQUESTS, 1, (method,))

    def finished(self, method: str) -> None:
        self._in_flight[method].pop()  # started() made the list and appended to it
        if self._record_changes:
            self._dispatcher.record(HTTP_SERVER_ACTIVE_REQUESTS, -1, (method,))

    def count(self, method: str) -> int:
        """Requests of *method* in flight now."""
        return len(self._in_flight.get(method, ()))

    def _first(self, method: str) -> list[None]:
        with self._lock:
            in_flight = self._in_flight.get(method)
            if in_flight is not None:
                return in_flight  # another thread made it meanwhile
            in_flight = self._in_flight[method] = []
        me = weakref.ref(self)

        def read() -> float | None:
            owner = me()
            return None if owner is None else float(owner.count(method))

        # Read for as long as the sentinel lives (its middleware may outlive close()).
        if self._dispatcher.level(HTTP_SERVER_ACTIVE_REQUESTS, (method,), read) is None:
            self._record_changes = True
        return in_flight


class Sentinel:
    """One configured asyncsentinel: settings, sinks, detectors and the request hooks.

    Create it through :func:`instrument` (FastAPI/Starlette) or directly and add
    :class:`SentinelMiddleware` yourself. Options are the fields of
    :class:`~asyncsentinel.config.Settings`; ``ASYNCSENTINEL_<NAME>`` environment variables
    supply the ones not given.
    """

    clock = staticmethod(time.perf_counter_ns)

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        tracer_provider: TracerProvider | None = None,
        sinks: Sequence[object] = (),
        settings: Settings | None = None,
        **options: Any,
    ) -> None:
        if settings is not None and options:
            raise ConfigError(
                "asyncsentinel: pass either settings= or individual options, not both"
            )
        self.settings = settings if settings is not None else Settings.load(options)
        s = self.settings
        self.prometheus = PrometheusSink(registry, max_label_sets=s.max_label_sets)
        self.registry = self.prometheus.registry
        self.memory = MemorySink(s.recent_findings)
        tracer = tracer_for(tracer_provider)
        all_sinks: list[object] = [self.prometheus, OpenTelemetrySink(tracer), self.memory]
        if s.log_findings:
            all_sinks.append(LogSink(rate_limit_seconds=s.log_rate_limit_seconds))
        all_sinks.extend(sinks)
        self.dispatcher = Dispatcher(all_sinks, ignore_kinds=s.ignore_kinds)
        self._resolve_route = RouteTemplates(s.max_routes)
        self._active = _ActiveRequests(self.dispatcher)
        self._server_spans = ServerSpans(tracer) if s.server_span else None
        self.started = False
        self._closed = False
        self.sources: list[Source] = []
        self._refresh_hooks()
        for setting, module_name, class_name in BUILTIN_SOURCES:
            if getattr(s, setting):
                source_class = getattr(importlib.import_module(module_name), class_name)
                self.add_source(source_class(s, self.dispatcher))

    # --- sources ---------------------------------------------------------------------------------
    def add_source(self, source: Source) -> Source:
        """Install a signal source and hook it into requests and the lifespan."""
        source.install()
        self.sources.append(source)
        self._refresh_hooks()
        return source

    def source(self, name: str) -> Source | None:
        """The installed source called *name*, if any."""
        return next((s for s in self.sources if s.name == name), None)

    def _refresh_hooks(self) -> None:
        # (component, hook) of the sources that have one: each call is contained on its own,
        # inline in the request path rather than through a wrapper per call.
        self._on_request_started = [
            (f"source.{s.name}", s.request_started)
            for s in self.sources
            if type(s).request_started is not Source.request_started
        ]
        self._on_request_finished = [
            (f"source.{s.name}", s.request_finished)
            for s in self.sources
            if type(s).request_finished is not Source.request_finished
        ]

    # --- integrations that need an object of the user's ------------------------------------------
    def _required_source(self, name: str, setting: str) -> Any:
        source = self.source(name)
        if source is None:
            raise ConfigError(
                f"asyncsentinel: the {name} source is off; enable it with {setting}=True "
                f"(or ASYNCSENTINEL_{setting.upper()}=true)"
            )
        return source

    def instrument_engine(self, engine: Any, *, name: str | None = None) -> str:
        """Name the pool of a SQLAlchemy ``Engine``/``AsyncEngine``; returns the pool name.

        Every engine is observed anyway; this only chooses the ``pool name`` label
        (default: the URL without credentials).
        """
        return str(
            self._required_source("sqlalchemy", "sqlalchemy").instrument_engine(engine, name=name)
        )

    def instrument_asyncpg_pool(self, pool: Any, *, name: str | None = None) -> str:
        """Observe a direct ``asyncpg.Pool`` (checkouts, waits, timeouts); returns its name."""
        return str(self._required_source("asyncpg", "sqlalchemy").instrument_pool(pool, name=name))

    def aiohttp_trace_config(self) -> Any:
        """An ``aiohttp.TraceConfig`` to pass to ``ClientSession(trace_configs=[...])``."""
        return self._required_source("aiohttp", "aiohttp").trace_config()

    # --- findings --------------------------------------------------------------------------------
    def findings(self, kind: str | None = None, *, http_route: str | None = None) -> list[Finding]:
        """Recent findings (a bounded ring buffer), oldest first, optionally filtered."""
        return self.memory.findings(kind, http_route=http_route)

    def report(self, finding: Finding) -> None:
        """Emit a finding through every sink (for custom detectors)."""
        self.dispatcher.emit(finding)

    def render_metrics(self, accept: str = "") -> tuple[bytes, str]:
        """The ``/metrics`` body and content type for this sentinel's registry."""
        return render_metrics(self.registry, accept)

    # --- requests (called by the middleware) ------------------------------------------------------
    def begin_request(self, scope: MutableMapping[str, Any]) -> RequestState | None:
        """Start tracking an HTTP request; ``None`` if asyncsentinel itself failed."""
        try:
            method = scope.get("method", "GET")
            if method not in _KNOWN_METHODS:
                method = "_OTHER"
            state = RequestState(method, scope, self._resolve_route)
            if self._server_spans is not None:
                state.span, state.extras["_otel_token"] = self._server_spans.start(scope, method)
            else:
                state.span = current_span()
            self._active.started(method)
            for component, hook in self._on_request_started:
                try:
                    hook(state)
                except Exception as exc:
                    self.dispatcher.report_error(component, exc)
            return state
        except Exception as exc:
            self.dispatcher.report_error("middleware", exc)
            return None

    def end_request(self, state: RequestState, error: BaseException | None) -> None:
        """Finish tracking: record metrics, run detectors' request hooks, close the span."""
        try:
            end_ns = state.response_end_ns or self.clock()
            if error is not None and isinstance(error, Exception) and not state.status_code:
                state.status_code = 500  # what the server's error handler will answer
            state.freeze()
            status = str(state.status_code) if state.status_code else ""
            self.dispatcher.record(
                HTTP_SERVER_REQUEST_DURATION,
                (end_ns - state.start_ns) / 1e9,
                (state.method, state.route, status),
            )
            self._active.finished(state.method)
            for component, hook in self._on_request_finished:
                try:
                    hook(state)
                except Exception as exc:
                    self.dispatcher.report_error(component, exc)
            self.dispatcher.request_finished(state)
        except Exception as exc:
            self.dispatcher.report_error("middleware", exc)
        finally:
            token = state.extras.pop("_otel_token", None)
            if self._server_spans is not None and token is not None:
                try:
                    self._server_spans.finish(state.span, token, state, error)
                except Exception as exc:
                    self.dispatcher.report_error("otel.server_span", exc)

    # --- lifespan -------------------------------------------------------------------------------
    async def startup(self) -> None:
        """Start every source's background work (idempotent)."""
        if self.started:
            return
        self.started = True
        for source in self.sources:
            try:
                await source.start()
            except Exception as exc:
                self.dispatcher.report_error(f"source.{source.name}", exc)

    async def shutdown(self) -> None:
        """Stop background work and run shutdown checks (e.g. pools never disposed)."""
        if not self.started:
            return
        self.started = False
        for source in reversed(self.sources):
            try:
                await source.stop()
            except Exception as exc:
                self.dispatcher.report_error(f"source.{source.name}", exc)

    def close(self) -> None:
        """Remove every listener, patch and hook this sentinel installed (e.g. between tests)."""
        if self._closed:
            return
        self._closed = True
        for source in reversed(self.sources):
            try:
                source.uninstall()
            except Exception as exc:
                self.dispatcher.report_error(f"source.{source.name}", exc)


def instrument(app: Any, *, engines: Iterable[Any] = (), **options: Any) -> Sentinel:
    """Instrument a FastAPI/Starlette application in one call and return its :class:`Sentinel`.

    Adds :class:`SentinelMiddleware` (which serves ``/metrics`` unless ``metrics_path=None`` and
    starts/stops background monitors with the app's lifespan), names the given SQLAlchemy
    engines' pools, and stores the sentinel as ``app.state.asyncsentinel``. ``options`` are
    the :class:`~asyncsentinel.config.Settings` fields plus ``registry``,
    ``tracer_provider`` and ``sinks``. Calling it twice on one app raises ``RuntimeError``.
    """
    state = getattr(app, "state", None)
    if state is None or not hasattr(app, "add_middleware"):
        raise TypeError(
            f"asyncsentinel.instrument() needs a Starlette or FastAPI application, got "
            f"{type(app).__qualname__}; for another ASGI app wrap it: "
            f"SentinelMiddleware(app, sentinel=Sentinel())"
        )
    if getattr(state, "asyncsentinel", None) is not None:
        raise RuntimeError(
            "asyncsentinel.instrument() was already called on this application; call it once "
            "and keep the Sentinel it returned (also available as app.state.asyncsentinel)."
        )
    sentinel = Sentinel(**options)
    for engine in engines:
        instrument_engine = getattr(sentinel, "instrument_engine", None)
        if instrument_engine is None:
            raise ConfigError(
                "asyncsentinel: engines= needs the SQLAlchemy source (sqlalchemy=True)"
            )
        instrument_engine(engine)
    app.add_middleware(SentinelMiddleware, sentinel=sentinel)
    state.asyncsentinel = sentinel
    return sentinel
