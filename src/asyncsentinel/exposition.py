"""The ``/metrics`` endpoint: Prometheus text exposition, multiprocess-aware.

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn/uvicorn with several workers), each scrape
aggregates the files every worker wrote, so any worker answers with the totals of all of them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from asyncsentinel.sinks.prometheus import multiprocess_enabled


def render_metrics(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The exposition body and its content type, negotiated from the Accept header."""
    encoder, content_type = choose_encoder(accept)
    if multiprocess_enabled():
        aggregate = CollectorRegistry()
        MultiProcessCollector(aggregate)  # type: ignore[no-untyped-call]
        return encoder(aggregate), content_type
    return encoder(registry), content_type
