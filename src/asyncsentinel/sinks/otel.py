"""OpenTelemetry sink: findings become span events; incidents with a duration become spans.

* A finding that belongs to a request whose span is still recording becomes an event
  ``asyncsentinel.<kind>`` on that span (the span of opentelemetry-instrumentation-asgi, or the one
  asyncsentinel creates with ``server_span=True``).
* A finding with an ``interval`` (e.g. a blocked event loop) becomes its own span covering the
  interval, linked to the request span when there is one.
* Any other finding (after the request ended, or outside requests) becomes a short span
  ``asyncsentinel.finding`` carrying the event, linked to the request span if known.

Attribute names follow the semantic conventions where one exists (``code.*``, ``http.route``);
the rest are namespaced ``asyncsentinel.*``.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.util.types import AttributeValue

from asyncsentinel.context import RequestState
from asyncsentinel.findings import EVENT_LOOP_BLOCKED, Finding
from asyncsentinel.frames import format_stack

# Spans for findings that describe an interval; other kinds become events.
INTERVAL_SPAN_NAMES = {EVENT_LOOP_BLOCKED: "asyncsentinel.event_loop.blocked"}


def tracer_for(provider: TracerProvider | None) -> Tracer:
    from asyncsentinel import __version__

    return trace.get_tracer("asyncsentinel", __version__, tracer_provider=provider)


def finding_attributes(finding: Finding) -> dict[str, AttributeValue]:
    """The attributes describing a finding, on an event or a span."""
    attrs: dict[str, AttributeValue] = {
        "asyncsentinel.finding.kind": finding.kind,
        "asyncsentinel.finding.severity": str(finding.severity),
        "asyncsentinel.finding.message": finding.message,
    }
    if finding.http_route:
        attrs["http.route"] = finding.http_route
    if finding.culprit is not None:
        attrs["code.file.path"] = finding.culprit.filename
        attrs["code.line.number"] = finding.culprit.lineno
        attrs["code.function.name"] = finding.culprit.function
    if finding.stack:
        attrs["code.stacktrace"] = format_stack(finding.stack)
    for key, value in finding.evidence.items():
        attrs[f"asyncsentinel.evidence.{key}"] = value
    return attrs


class OpenTelemetrySink:
    """Adds findings to traces and request-level attributes to request spans."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def emit(self, finding: Finding) -> None:
        # The attributes (a formatted stack with source lines among them) are built only for a
        # span that records: with no tracing configured, or a span sampled out, they would be
        # thrown away, and an N+1 or a slow query is reported on every request of its route.
        request_span: Span | None = finding.span
        event_name = f"asyncsentinel.{finding.kind}"
        interval = finding.evidence.get("started_at"), finding.evidence.get("ended_at")
        if finding.kind in INTERVAL_SPAN_NAMES and all(isinstance(t, float) for t in interval):
            if not self._can_record():
                return
            start_ns, end_ns = (int(float(t) * 1e9) for t in interval)  # type: ignore[arg-type]
            span = self._tracer.start_span(
                INTERVAL_SPAN_NAMES[finding.kind],
                links=_links_to(request_span),
                start_time=start_ns,
                kind=SpanKind.INTERNAL,
            )
            if span.is_recording():
                attrs = finding_attributes(finding)
                span.set_attributes(attrs)
                span.add_event(event_name, attrs, timestamp=end_ns)
                span.set_status(Status(StatusCode.ERROR, finding.message))
            span.end(end_time=end_ns)
            return
        if request_span is not None and request_span.is_recording():
            request_span.add_event(event_name, finding_attributes(finding))
            return
        current = trace.get_current_span()
        if request_span is None and current.is_recording():
            current.add_event(event_name, finding_attributes(finding))
            return
        if not self._can_record():
            return
        span = self._tracer.start_span("asyncsentinel.finding", links=_links_to(request_span))
        if span.is_recording():
            attrs = finding_attributes(finding)
            span.set_attributes(attrs)
            span.add_event(event_name, attrs)
        span.end()

    def _can_record(self) -> bool:
        """False while the tracer is OpenTelemetry's no-op one (no tracer provider set): a span
        it starts records nothing, so none is started (a few µs per finding saved)."""
        tracer = self._tracer
        if isinstance(tracer, trace.ProxyTracer):
            # The global provider's tracer once one is set, the no-op tracer until then.
            tracer = getattr(tracer, "_tracer", tracer)
        return not isinstance(tracer, trace.NoOpTracer)

    def request_finished(self, state: RequestState) -> None:
        span = state.span
        if span is not None and state.span_attributes and span.is_recording():
            span.set_attributes(state.span_attributes)


def _links_to(span: Span | None) -> list[Link]:
    if span is None:
        return []
    ctx = span.get_span_context()
    return [Link(ctx)] if ctx.is_valid else []


def current_span() -> Any:
    """The active span if it records, else ``None`` (cheap: one context lookup)."""
    span = trace.get_current_span()
    return span if span.is_recording() else None


class ServerSpans:
    """Creates the HTTP server span when no OpenTelemetry ASGI instrumentation does.

    Follows the HTTP semantic conventions: name ``{method} {route}``, kind SERVER, parent taken
    from incoming W3C trace context headers, ``http.request.method``, ``url.path``,
    ``url.scheme``, ``http.route``, ``http.response.status_code``; 5xx marks the span as error.
    The query string is not recorded (it often carries tokens).
    """

    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import propagate
        from opentelemetry.instrumentation.asgi import asgi_getter

        self._tracer = tracer
        self._context = otel_context
        self._extract: Callable[..., Any] = propagate.extract
        self._getter = asgi_getter

    def start(self, scope: MutableMapping[str, Any], method: str) -> tuple[Span, object]:
        """Start the span and make it current; returns it and the token for :meth:`finish`."""
        parent = self._extract(scope, getter=self._getter)
        attrs: dict[str, AttributeValue] = {
            "http.request.method": method,
            "url.path": scope.get("path", ""),
            "url.scheme": scope.get("scheme", "http"),
        }
        server = scope.get("server")
        if server and server[0]:
            attrs["server.address"] = server[0]
            if server[1] is not None:
                attrs["server.port"] = server[1]
        if version := scope.get("http_version"):
            attrs["network.protocol.version"] = version
        span = self._tracer.start_span(
            method, context=parent, kind=SpanKind.SERVER, attributes=attrs
        )
        token = self._context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def finish(
        self, span: Span, token: object, state: RequestState, error: BaseException | None
    ) -> None:
        """Name the span after its route, record the status and end it."""
        try:
            route = state.route
            if route and not route.startswith("__"):
                span.update_name(f"{state.method} {route}")
                span.set_attribute("http.route", route)
            if state.status_code:
                span.set_attribute("http.response.status_code", state.status_code)
            if error is not None and not isinstance(error, Exception):
                pass  # cancellation/exit of the server task: not an application error
            elif error is not None:
                # Only the type: exception messages (database errors above all) can carry
                # literal values, and no SQL parameter value may leave the process.
                span.set_attribute("error.type", type(error).__qualname__)
                span.set_status(Status(StatusCode.ERROR))
            elif state.status_code >= 500:
                span.set_attribute("error.type", str(state.status_code))
                span.set_status(Status(StatusCode.ERROR))
            span.end()
        finally:
            self._context.detach(token)  # type: ignore[arg-type]
