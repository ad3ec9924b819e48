"""OpenTelemetry: findings become span events; asyncsentinel can create the server span."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from fastapi import FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer, NoOpTracerProvider, SpanKind, StatusCode

from asyncsentinel import Sentinel, SentinelMiddleware
from asyncsentinel.findings import EVENT_LOOP_BLOCKED, SLOW_QUERY, Finding
from asyncsentinel.frames import current_stack, user_culprit
from asyncsentinel.sinks import otel


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://t"
    )


def app_reporting(sentinel: Sentinel) -> FastAPI:
    app = FastAPI()

    @app.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, int]:
        stack = current_stack()
        sentinel.report(
            Finding.create(
                SLOW_QUERY,
                "statement took 1.2 s",
                culprit=user_culprit(stack),
                stack=stack,
                evidence={"statement": "SELECT orders.id FROM orders"},
            )
        )
        return {"id": order_id}

    @app.get("/fail")
    async def fail() -> None:
        raise RuntimeError("nope")

    return app


async def test_finding_is_an_event_on_the_span_of_otel_asgi_instrumentation(
    make_sentinel: Callable[..., Sentinel],
    spans: InMemorySpanExporter,
    tracer_provider: Any,
) -> None:
    sentinel = make_sentinel()
    app = app_reporting(sentinel)
    app.add_middleware(SentinelMiddleware, sentinel=sentinel)
    traced = OpenTelemetryMiddleware(app, tracer_provider=tracer_provider)
    async with client(traced) as c:
        assert (await c.get("/orders/7")).status_code == 200
    server = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(server) == 1
    (event,) = [e for e in server[0].events if e.name == "asyncsentinel.slow_query"]
    attrs = dict(event.attributes or {})
    assert attrs["asyncsentinel.finding.kind"] == "slow_query"
    assert attrs["http.route"] == "/orders/{order_id}"
    assert attrs["code.file.path"] == __file__
    assert attrs["code.function.name"] == "app_reporting.<locals>.order"
    assert isinstance(attrs["code.line.number"], int)
    assert attrs["asyncsentinel.evidence.statement"] == "SELECT orders.id FROM orders"
    assert "stack = current_stack()" in str(attrs["code.stacktrace"])  # source lines too
    (finding,) = sentinel.findings(SLOW_QUERY)
    ctx = server[0].get_span_context()
    assert finding.trace_id == f"{ctx.trace_id:032x}"


async def test_server_span_follows_http_semantic_conventions(
    make_sentinel: Callable[..., Sentinel],
    spans: InMemorySpanExporter,
) -> None:
    sentinel = make_sentinel(server_span=True)
    app = app_reporting(sentinel)
    app.add_middleware(SentinelMiddleware, sentinel=sentinel)
    parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{parent_trace}-00f067aa0ba902b7-01"}
    async with client(app) as c:
        assert (await c.get("/orders/7?token=hunter2", headers=headers)).status_code == 200
        assert (await c.get("/fail")).status_code == 500
    finished = {s.name: s for s in spans.get_finished_spans()}
    span = finished["GET /orders/{order_id}"]
    assert span.kind == SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == parent_trace  # W3C trace context honoured
    attrs = dict(span.attributes or {})
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.route"] == "/orders/{order_id}"
    assert attrs["http.response.status_code"] == 200
    assert attrs["url.path"] == "/orders/7"
    assert "hunter2" not in str(attrs)  # the query string is not recorded
    assert [e.name for e in span.events] == ["asyncsentinel.slow_query"]
    failed = finished["GET /fail"]
    assert failed.status.status_code == StatusCode.ERROR
    assert dict(failed.attributes or {})["http.response.status_code"] == 500


async def test_finding_after_the_request_becomes_a_linked_span(
    make_sentinel: Callable[..., Sentinel],
    spans: InMemorySpanExporter,
) -> None:
    sentinel = make_sentinel(server_span=True)
    kept: list[Any] = []
    app = FastAPI()

    @app.get("/later")
    async def later() -> dict[str, bool]:
        from asyncsentinel.context import current_request

        kept.append(current_request())
        return {"ok": True}

    app.add_middleware(SentinelMiddleware, sentinel=sentinel)
    async with client(app) as c:
        await c.get("/later")
    # e.g. a leak detector reporting after the response went out
    sentinel.report(Finding.create("task_leaked", "still running", request=kept[0]))
    finished = {s.name: s for s in spans.get_finished_spans()}
    request_span = finished["GET /later"]
    leak = finished["asyncsentinel.finding"]
    assert [link.context.span_id for link in leak.links] == [request_span.context.span_id]
    assert leak.events[0].name == "asyncsentinel.task_leaked"
    assert dict(leak.attributes or {})["http.route"] == "/later"


async def test_span_attributes_from_detectors_land_on_the_request_span(
    make_sentinel: Callable[..., Sentinel],
    spans: InMemorySpanExporter,
) -> None:
    sentinel = make_sentinel(server_span=True)
    app = FastAPI()

    @app.get("/count")
    async def count() -> dict[str, bool]:
        from asyncsentinel.context import current_request

        state = current_request()
        assert state is not None
        state.span_attributes["asyncsentinel.db.query_count"] = 3
        return {"ok": True}

    app.add_middleware(SentinelMiddleware, sentinel=sentinel)
    async with client(app) as c:
        await c.get("/count")
    (span,) = [s for s in spans.get_finished_spans() if s.name == "GET /count"]
    assert dict(span.attributes or {})["asyncsentinel.db.query_count"] == 3


def test_with_tracing_off_no_attributes_or_stack_text_are_built(
    monkeypatch: Any,
) -> None:
    """Findings of every request (an N+1, a slow query) cost no formatted stack when no tracer
    provider records: the attributes are built only for a span that records."""

    built: list[str] = []
    original = otel.finding_attributes

    def counting(finding: Finding) -> Any:
        built.append(finding.kind)
        return original(finding)

    monkeypatch.setattr(otel, "finding_attributes", counting)
    stack = current_stack()
    finding = Finding.create(
        SLOW_QUERY, "slow", culprit=user_culprit(stack), stack=stack, request=None
    )
    otel.OpenTelemetrySink(otel.tracer_for(NoOpTracerProvider())).emit(finding)
    assert built == []

    exporter = InMemorySpanExporter()
    provider = TracerProvider()

    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel.OpenTelemetrySink(otel.tracer_for(provider)).emit(finding)
    assert built == [SLOW_QUERY]
    (span,) = exporter.get_finished_spans()
    assert span.name == "asyncsentinel.finding"
    attributes = dict(span.attributes or {})
    assert attributes["code.line.number"] == finding.culprit.lineno  # type: ignore[union-attr]
    assert "test_otel.py" in str(attributes["code.stacktrace"])
    assert span.events[0].name == "asyncsentinel.slow_query"


def test_with_no_tracer_provider_no_span_is_started_for_a_finding() -> None:
    """The no-op tracer (nothing configured) would start a span that records nothing; the sink
    starts none. A tracer that can record gets one span per finding (previous test)."""
    started: list[str] = []

    class WatchedNoOpTracer(NoOpTracer):
        def start_span(self, name: str, *args: Any, **kwargs: Any) -> Any:
            started.append(name)
            return super().start_span(name, *args, **kwargs)

    finding = Finding.create(SLOW_QUERY, "slow", request=None)
    otel.OpenTelemetrySink(WatchedNoOpTracer()).emit(finding)
    blocked = Finding.create(
        EVENT_LOOP_BLOCKED, "blocked", evidence={"started_at": 1.0, "ended_at": 2.0}, request=None
    )
    otel.OpenTelemetrySink(WatchedNoOpTracer()).emit(blocked)
    assert started == []
