"""The applications compared by the request-overhead benchmark: one FastAPI app per variant.

Every variant is the same trivial JSON route on its own ``FastAPI`` instance, instrumented the
way that library's documentation tells a user to, each with its own registry / providers so the
variants can live in one process without sharing state:

* ``bare`` — no instrumentation: the baseline.
* ``asyncsentinel`` — ``asyncsentinel.instrument(app, registry=CollectorRegistry())`` with default
  settings, i.e. all its request-path work on (every detector enabled by default included).
* ``prometheus-fastapi-instrumentator`` — ``Instrumentator(registry=...).instrument(app)
  .expose(app)``: its default HTTP metrics.
* ``opentelemetry-instrumentation-fastapi`` — ``FastAPIInstrumentor.instrument_app`` with an SDK
  ``TracerProvider`` (``BatchSpanProcessor`` to an exporter that only counts) and an SDK
  ``MeterProvider`` (in-memory reader).
* ``asyncsentinel+server-span`` (opt-in) — asyncsentinel creating the OpenTelemetry server span
  itself (``server_span=True``) on the same kind of SDK tracer.
* ``asyncsentinel-no-sources`` (opt-in) — every built-in source (detector) switched off: the
  middleware and HTTP metrics alone, to tell the core's cost from the detectors'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

ROUTE_TEMPLATE = "/items/{item_id}"
REQUEST_PATH = "/items/42"
EXPECTED_BODY = b'{"item_id":42,"ok":true}'

BARE = "bare"
ASYNCSENTINEL = "asyncsentinel"
INSTRUMENTATOR = "prometheus-fastapi-instrumentator"
OTEL = "opentelemetry-instrumentation-fastapi"
ASYNCSENTINEL_SERVER_SPAN = "asyncsentinel+server-span"
ASYNCSENTINEL_NO_SOURCES = "asyncsentinel-no-sources"

DEFAULT_VARIANTS: tuple[str, ...] = (BARE, ASYNCSENTINEL, INSTRUMENTATOR, OTEL)
ALL_VARIANTS: tuple[str, ...] = (
    *DEFAULT_VARIANTS,
    ASYNCSENTINEL_SERVER_SPAN,
    ASYNCSENTINEL_NO_SOURCES,
)


def _no_sources() -> dict[str, bool]:
    from asyncsentinel.sentinel import BUILTIN_SOURCES

    return {setting: False for setting, _, _ in BUILTIN_SOURCES}


NO_SOURCES: dict[str, bool] = _no_sources()
"""Settings that switch every built-in source off: the core (middleware + HTTP metrics) alone."""


def make_app() -> FastAPI:
    """The application under test: one trivial JSON route with a path parameter."""
    app = FastAPI()

    @app.get(ROUTE_TEMPLATE, response_model=None)
    async def read_item(item_id: int) -> dict[str, Any]:
        return {"item_id": item_id, "ok": True}

    return app


def _sample_sum(registry: CollectorRegistry, name: str) -> float:
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name
    )


@dataclass
class Variant:
    """One instrumented application plus what the benchmark needs to drive and check it."""

    name: str
    app: Any
    after_batch: Callable[[], None] = lambda: None
    """Called after each timed batch, outside the timing (e.g. flush queued spans)."""
    recorded: Callable[[], float] = lambda: float("nan")
    """How many requests the instrumentation recorded: proves it really ran."""
    errors: Callable[[], float] = lambda: 0.0
    """asyncsentinel's own contained internal errors (must stay 0)."""
    findings: Callable[[], list[str]] = list
    """Findings asyncsentinel reported; the app is healthy, so any is a false positive."""
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Release providers and hooks (threads of the OpenTelemetry SDK, sources)."""
        for close in reversed(self.closers):
            close()


class _CountingSpanExporter:
    """A span exporter that only counts: the SDK's export path runs, nothing leaves."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Nothing is buffered here."""
        return True


def _sdk_tracer_provider() -> tuple[Any, _CountingSpanExporter]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = _CountingSpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))  # type: ignore[arg-type]
    return provider, exporter


def _asyncsentinel(
    name: str,
    *,
    server_span: bool = False,
    sources: bool = True,
    options: dict[str, Any] | None = None,
) -> Variant:
    import asyncsentinel

    app = make_app()
    registry = CollectorRegistry()
    options = {**(options or {}), "registry": registry}
    if not sources:
        options.update(NO_SOURCES)
    provider: Any = None
    if server_span:
        provider, _ = _sdk_tracer_provider()
        options.update(tracer_provider=provider, server_span=True)
    sentinel = asyncsentinel.instrument(app, **options)
    variant = Variant(
        name,
        app,
        recorded=lambda: _sample_sum(registry, "http_server_request_duration_seconds_count"),
        errors=lambda: _sample_sum(registry, "asyncsentinel_instrumentation_errors_total"),
        findings=lambda: [f"{f.kind} at {f.culprit}" for f in sentinel.findings()],
        closers=[sentinel.close],
    )
    if provider is not None:
        variant.after_batch = provider.force_flush
        variant.closers.insert(0, provider.shutdown)
    return variant


def _instrumentator() -> Variant:
    from prometheus_fastapi_instrumentator import Instrumentator

    app = make_app()
    registry = CollectorRegistry()
    Instrumentator(registry=registry).instrument(app).expose(app)
    return Variant(
        INSTRUMENTATOR,
        app,
        recorded=lambda: _sample_sum(registry, "http_request_duration_seconds_count"),
    )


def _opentelemetry() -> Variant:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    app = make_app()
    tracer_provider, exporter = _sdk_tracer_provider()
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=tracer_provider, meter_provider=meter_provider
    )

    def recorded() -> float:
        tracer_provider.force_flush()
        # One SERVER span per request plus INTERNAL spans for http.response.start/body.
        return float(exporter.spans)

    return Variant(
        OTEL,
        app,
        after_batch=tracer_provider.force_flush,
        recorded=recorded,
        closers=[
            lambda: FastAPIInstrumentor.uninstrument_app(app),
            tracer_provider.shutdown,
            meter_provider.shutdown,
        ],
    )


def asyncsentinel_details() -> dict[str, Any]:
    """What the default-settings asyncsentinel variant runs: its sources and request hooks.

    Recorded with the results because the figure grows as detectors with request hooks land.
    """
    from asyncsentinel import Sentinel

    sentinel = Sentinel(registry=CollectorRegistry())
    try:
        return {
            "sources": [source.name for source in sentinel.sources],
            "request_started_hooks": len(sentinel._on_request_started),
            "request_finished_hooks": len(sentinel._on_request_finished),
            "server_span": sentinel.settings.server_span,
        }
    finally:
        sentinel.close()


def _option_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "on", "false", "off"):
        return lowered in ("true", "on")
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def is_known(name: str) -> bool:
    """A variant name :func:`build` accepts (``asyncsentinel/k=v/...`` included)."""
    return name in ALL_VARIANTS or name.startswith(ASYNCSENTINEL + "/")


def build(name: str) -> Variant:
    """A fresh application instrumented as variant *name*.

    ``asyncsentinel/<setting>=<value>/...`` is asyncsentinel with those settings changed, e.g.
    ``asyncsentinel/task_tracking=false`` to see what one detector costs.
    """
    if name.startswith(ASYNCSENTINEL + "/"):
        options = dict(part.split("=", 1) for part in name.split("/")[1:])
        return _asyncsentinel(name, options={k: _option_value(v) for k, v in options.items()})
    if name == BARE:
        return Variant(BARE, make_app())
    if name == ASYNCSENTINEL:
        return _asyncsentinel(name)
    if name == ASYNCSENTINEL_NO_SOURCES:
        return _asyncsentinel(name, sources=False)
    if name == ASYNCSENTINEL_SERVER_SPAN:
        return _asyncsentinel(name, server_span=True)
    if name == INSTRUMENTATOR:
        return _instrumentator()
    if name == OTEL:
        return _opentelemetry()
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")
