"""The core model: a :class:`Finding`, the finding kinds, the sink interface and the dispatcher.

Data flows one way: signal sources (detectors) create findings and record observations; the
:class:`Dispatcher` hands them to every sink (Prometheus, OpenTelemetry, logs, memory). A failing
sink or detector never reaches the application: the error is counted in
``asyncsentinel_instrumentation_errors_total{component}`` and logged once per component.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from asyncsentinel.context import RequestState, current_request
from asyncsentinel.frames import Location
from asyncsentinel.instruments import FINDINGS, INSTRUMENTATION_ERRORS, Instrument

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger("asyncsentinel")

# --- finding kinds (stable names: metrics, alerts and users' ignore lists rely on them) -----------
N_PLUS_ONE = "n_plus_one"
SLOW_QUERY = "slow_query"
POOL_EXHAUSTED = "pool_exhausted"
SESSION_SHARED_ACROSS_TASKS = "session_shared_across_tasks"
SYNC_DB_ON_EVENT_LOOP = "sync_db_on_event_loop"
ENGINE_CREATED_IN_REQUEST = "engine_created_in_request"
CONNECTION_LEAKED = "connection_leaked"
POOL_NOT_DISPOSED = "pool_not_disposed"
LAZY_LOAD_IN_ASYNC = "lazy_load_in_async"
DB_CONFIGURATION_ADVICE = "db_configuration_advice"
EVENT_LOOP_BLOCKED = "event_loop_blocked"
TASK_LEAKED = "task_leaked"
CANCELLATION_SWALLOWED = "cancellation_swallowed"
TASK_EXCEPTION_UNRETRIEVED = "task_exception_unretrieved"
CLIENT_SESSION_PER_REQUEST = "client_session_per_request"
CLIENT_SESSION_UNCLOSED = "client_session_unclosed"

KINDS: tuple[str, ...] = (
    N_PLUS_ONE,
    SLOW_QUERY,
    POOL_EXHAUSTED,
    SESSION_SHARED_ACROSS_TASKS,
    SYNC_DB_ON_EVENT_LOOP,
    ENGINE_CREATED_IN_REQUEST,
    CONNECTION_LEAKED,
    POOL_NOT_DISPOSED,
    LAZY_LOAD_IN_ASYNC,
    EVENT_LOOP_BLOCKED,
    TASK_LEAKED,
    CANCELLATION_SWALLOWED,
    TASK_EXCEPTION_UNRETRIEVED,
    CLIENT_SESSION_PER_REQUEST,
    CLIENT_SESSION_UNCLOSED,
    DB_CONFIGURATION_ADVICE,
)
"""Every finding kind, in the order reports list them: database, event loop and tasks, HTTP
client, advice."""
ALL_KINDS: frozenset[str] = frozenset(KINDS)

EvidenceValue = str | int | float | bool


class Severity(enum.StrEnum):
    """How urgent a finding is; also the log level it is written at."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def log_level(self) -> int:
        return {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}[self]


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected mistake, with where it happened and the evidence for it.

    Build findings with :meth:`Finding.create`, which fills the request fields (route, method,
    trace and span ids) from the current request context.
    """

    kind: str
    message: str
    severity: Severity = Severity.WARNING
    http_route: str = ""
    """Route template of the request the finding belongs to; '' outside any request."""
    http_method: str = ""
    culprit: Location | None = None
    """The user-code location responsible (``file:line in function``)."""
    stack: tuple[Location, ...] = ()
    """The captured stack, outermost first, when the detector took one."""
    evidence: Mapping[str, EvidenceValue] = field(default_factory=lambda: MappingProxyType({}))
    trace_id: str = ""
    span_id: str = ""
    timestamp: float = field(default_factory=time.time)
    span: Any = field(default=None, repr=False, compare=False)
    """The live OpenTelemetry span of the request, for sinks that add events; not serialised."""

    @classmethod
    def create(
        cls,
        kind: str,
        message: str,
        *,
        severity: Severity = Severity.WARNING,
        culprit: Location | None = None,
        stack: Iterable[Location] = (),
        evidence: Mapping[str, EvidenceValue] | None = None,
        request: RequestState | bool | None = True,
    ) -> Finding:
        """A finding attributed to *request* (default: the current request, if any).

        Pass ``request=None`` for a finding that belongs to no request.
        """
        state = current_request() if request is True else request or None
        route = method = trace_id = span_id = ""
        span = None
        if isinstance(state, RequestState):
            route, method, span = state.route, state.method, state.span
            if span is not None:
                ctx = span.get_span_context()
                if ctx.is_valid:
                    trace_id, span_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        return cls(
            kind=kind,
            message=message,
            severity=severity,
            http_route=route,
            http_method=method,
            culprit=culprit,
            stack=tuple(stack),
            evidence=MappingProxyType(dict(evidence or {})),
            trace_id=trace_id,
            span_id=span_id,
            span=span,
        )

    @property
    def dedupe_key(self) -> tuple[str, str, str]:
        """Identical findings share this key: same kind, route and culprit."""
        return (self.kind, self.http_route, str(self.culprit) if self.culprit else self.message)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (for structured logs and reports)."""
        return {
            "kind": self.kind,
            "severity": str(self.severity),
            "message": self.message,
            "http_route": self.http_route,
            "http_method": self.http_method,
            "culprit": str(self.culprit) if self.culprit else None,
            "stack": [str(loc) for loc in self.stack],
            "evidence": dict(self.evidence),
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "timestamp": self.timestamp,
        }


# --- the sink interface ---------------------------------------------------------------------------
@runtime_checkable
class FindingSink(Protocol):
    """Receives every finding that is not ignored."""

    def emit(self, finding: Finding) -> None: ...


@runtime_checkable
class MeasurementSink(Protocol):
    """Receives observations: counter increments, histogram samples, gauge deltas and levels."""

    def record(self, instrument: Instrument, value: float, labels: tuple[str, ...]) -> None: ...

    def set(self, instrument: Instrument, value: float, labels: tuple[str, ...]) -> None: ...


@runtime_checkable
class RequestSink(Protocol):
    """Told when a request finished (after detectors looked at it), e.g. to annotate its span."""

    def request_finished(self, state: RequestState) -> None: ...


_MAX_BOUND_RECORDERS = 4096  # label sets whose bound recorder Dispatcher.record keeps


class Dispatcher:
    """Fans findings and observations out to sinks; contains and counts every error."""

    def __init__(self, sinks: Sequence[object], *, ignore_kinds: Iterable[str] = ()) -> None:
        self._finding_sinks = [s for s in sinks if isinstance(s, FindingSink)]
        self._measurement_sinks = [s for s in sinks if isinstance(s, MeasurementSink)]
        self._request_sinks = [s for s in sinks if isinstance(s, RequestSink)]
        self._ignore = frozenset(ignore_kinds)
        self._logged_components: set[str] = set()
        self._lock = threading.Lock()
        self._bound: dict[tuple[str, tuple[str, ...]], Callable[[float], None]] = {}

    def emit(self, finding: Finding) -> None:
        """Count the finding and hand it to every finding sink (unless its kind is ignored)."""
        if finding.kind in self._ignore:
            return
        self.record(FINDINGS, 1, (finding.kind, finding.http_route))
        for sink in self._finding_sinks:
            try:
                sink.emit(finding)
            except Exception as exc:
                self.report_error(f"sink.{type(sink).__name__}", exc)

    def record(self, instrument: Instrument, value: float, labels: tuple[str, ...] = ()) -> None:
        """Counter increment, histogram sample or gauge delta, by the instrument's kind.

        Through a :meth:`recorder` bound on first use and kept (bounded): the request path
        records three times per request, and a bound recorder skips every lookup.
        """
        key = (instrument.name, labels)
        bound = self._bound.get(key)
        if bound is None:
            bound = self.recorder(instrument, labels)
            if len(self._bound) >= _MAX_BOUND_RECORDERS:
                self._bound.clear()
            self._bound[key] = bound
        bound(value)

    def recorder(
        self, instrument: Instrument, labels: tuple[str, ...] = ()
    ) -> Callable[[float], None]:
        """:meth:`record` bound to one instrument and label set, for per-statement hot paths.

        A sink with a ``recorder(instrument, labels, on_error)`` method hands out its own bound
        function (the Prometheus sink: the metric child's, with no lookup left per call); other
        sinks are called through ``record``. Like ``record`` it never raises: sink errors are
        counted under the sink's component.
        """
        parts: list[Callable[[float], None]] = []
        for sink in self._measurement_sinks:
            make = getattr(sink, "recorder", None)
            if make is None:
                parts.append(functools.partial(self._record_one, sink, instrument, labels))
                continue
            on_error = functools.partial(self.report_error, f"sink.{type(sink).__name__}")
            try:
                parts.append(make(instrument, labels, on_error))
            except Exception as exc:
                on_error(exc)
                parts.append(functools.partial(self._record_one, sink, instrument, labels))
        if len(parts) == 1:
            return parts[0]

        def record_all(value: float) -> None:
            for part in parts:
                part(value)

        return record_all

    def _record_one(
        self, sink: MeasurementSink, instrument: Instrument, labels: tuple[str, ...], value: float
    ) -> None:
        try:
            sink.record(instrument, value, labels)
        except Exception as exc:
            self.report_error(f"sink.{type(sink).__name__}", exc)

    def set(self, instrument: Instrument, value: float, labels: tuple[str, ...] = ()) -> None:
        """Set a gauge to a level."""
        for sink in self._measurement_sinks:
            try:
                sink.set(instrument, value, labels)
            except Exception as exc:
                self.report_error(f"sink.{type(sink).__name__}", exc)

    def level(
        self,
        instrument: Instrument,
        labels: tuple[str, ...],
        read: Callable[[], float | None],
    ) -> Callable[[], None] | None:
        """Have every measurement sink read a gauge's level from *read* when it reports
        (``None`` from *read*: its owner is gone). Returns the function that stops it, or
        ``None`` if any sink cannot (then record the level's changes with :meth:`record`)."""
        removers: list[Callable[[], None]] = []
        for sink in self._measurement_sinks:
            register = getattr(sink, "level", None)
            try:
                remove = register(instrument, labels, read) if register is not None else None
            except Exception as exc:
                self.report_error(f"sink.{type(sink).__name__}", exc)
                remove = None
            if remove is None:
                for undo in removers:
                    undo()
                return None
            removers.append(remove)

        def remove_all() -> None:
            for undo in removers:
                undo()

        return remove_all

    def request_finished(self, state: RequestState) -> None:
        for sink in self._request_sinks:
            try:
                sink.request_finished(state)
            except Exception as exc:
                self.report_error(f"sink.{type(sink).__name__}", exc)

    def report_error(self, component: str, exc: BaseException) -> None:
        """Count an internal error; log it with its traceback the first time per component."""
        try:
            if component not in self._logged_components:
                with self._lock:
                    first = component not in self._logged_components
                    self._logged_components.add(component)
                if first:
                    logger.error(
                        "asyncsentinel: internal error in %s (contained; the application is "
                        "unaffected; further errors of this component are only counted in "
                        "asyncsentinel_instrumentation_errors_total)",
                        component,
                        exc_info=exc,
                    )
            for sink in self._measurement_sinks:
                sink.record(INSTRUMENTATION_ERRORS, 1, (component,))
        except Exception:
            pass
