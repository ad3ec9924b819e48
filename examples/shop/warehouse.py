"""A stand-in for the warehouse's stock API, the external HTTP service the shop calls.

It is a tiny standard-library HTTP server on its own thread, so it is not part of the
application being observed and works without network access. ``GET /stock/<product_id>``
answers ``{"product_id": ..., "available": ...}``; ``?delay=<seconds>`` makes it answer slowly,
like a real dependency on a bad day.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

MAX_DELAY_SECONDS = 5.0


class _StockHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the shop's connection pool reuses connections

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        segments = parts.path.strip("/").split("/")
        if len(segments) != 2 or segments[0] != "stock" or not segments[1].isdigit():
            self._reply(404, {"detail": "not found"})
            return
        try:
            delay = float(parse_qs(parts.query).get("delay", ["0"])[0])
        except ValueError:
            delay = 0.0
        if delay > 0:
            time.sleep(min(delay, MAX_DELAY_SECONDS))  # this thread is the slow dependency
        product_id = int(segments[1])
        self._reply(200, {"product_id": product_id, "available": product_id * 7 % 23})

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the shop's own logs are the interesting ones."""


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A caller that gave up (a timeout cancelled its request) closes the socket while a
        # delayed answer is still being written; that is expected here, not worth a traceback.
        pass


class Warehouse:
    """Runs the stand-in warehouse API on ``127.0.0.1`` and a free port."""

    def __init__(self) -> None:
        self._server = _QuietServer(("127.0.0.1", 0), _StockHandler)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="warehouse-api",
            daemon=True,
        )

    def start(self) -> str:
        """Start serving; returns the base URL."""
        self._thread.start()
        return self.url

    async def stop(self) -> None:
        """Stop serving (waits for the server thread off the event loop)."""
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
