"""Loopback mode: each variant in its own uvicorn process, driven by a keep-alive client.

``python benchmarks/loopback.py serve --variant NAME`` runs one variant under uvicorn on a
127.0.0.1 port it picks itself, prints ``PORT <n>`` when it listens and, after SIGTERM and a
graceful shutdown, one JSON line with what its instrumentation recorded. The benchmark process
(another process, so client and server do not share a GIL) starts one server per variant and
drives them with :class:`KeepAliveClient`: a few persistent HTTP/1.1 connections, each sending
the next request as soon as the previous response is complete (closed loop). The server's single
event loop is the bottleneck, so time per request is the server's cost per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import variants

REQUEST = (
    f"GET {variants.REQUEST_PATH} HTTP/1.1\r\n"
    "Host: 127.0.0.1\r\n"
    "User-Agent: asyncsentinel-benchmark\r\n"
    "Accept: application/json\r\n"
    "\r\n"
).encode("ascii")


def http_implementation() -> str:
    """The uvicorn HTTP protocol used: httptools when installed (``uvicorn[standard]``)."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


# --- server side (child process) ------------------------------------------------------------------
def serve(variant_name: str, loop: str) -> None:
    """Run one variant under uvicorn until SIGTERM; then print its recorded counts."""
    import uvicorn

    variant = variants.build(variant_name)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections made before uvicorn is up wait in the backlog
    config = uvicorn.Config(
        variant.app,
        loop=loop,
        http=http_implementation(),
        lifespan="on",
        log_level="warning",
        access_log=False,
        # The client keeps its connections idle while other variants are measured.
        timeout_keep_alive=3600,
    )
    server = uvicorn.Server(config)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])
    variant.after_batch()
    print(
        json.dumps(
            {
                "recorded": variant.recorded(),
                "errors": variant.errors(),
                "findings": variant.findings(),
            }
        ),
        flush=True,
    )
    variant.close()


class ServerProcess:
    """A variant's uvicorn server in a child process (started and stopped by us)."""

    def __init__(self, variant_name: str, loop: str) -> None:
        self.variant = variant_name
        command = [sys.executable, str(Path(__file__).resolve()), "serve"]
        self.process = subprocess.Popen(
            [*command, "--variant", variant_name, "--loop", loop],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.process.kill()
            raise RuntimeError(f"server for {variant_name} did not start (got {line!r})")
        self.port = int(line.split()[1])

    def cpu_ns(self) -> int | None:
        """CPU time the server's threads have used so far, in ns (Linux ``schedstat``).

        Read around each batch, it gives the server's CPU cost per request, which the load of
        other jobs on a shared machine disturbs much less than wall-clock time.
        """
        total = 0
        try:
            for task in Path(f"/proc/{self.process.pid}/task").iterdir():
                try:
                    total += int((task / "schedstat").read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    continue  # a thread that just ended
        except OSError:
            return None
        return total

    def stop(self) -> dict[str, Any]:
        """Graceful shutdown (lifespan runs); returns the server's recorded counts."""
        self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                result: dict[str, Any] = json.loads(line)
                return result
        return {}


# --- client side (benchmark process) --------------------------------------------------------------
class _Connection(asyncio.Protocol):
    """One keep-alive connection sending requests back to back and checking every response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.remaining = 0
        self.not_ok = 0
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def send_batch(self, count: int, done: asyncio.Future[None]) -> None:
        assert self.transport is not None
        self.remaining, self.done = count, done
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(buffer[:head_end]).lower()
            at = head.find(b"\r\ncontent-length:")
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : line_end if line_end >= 0 else None])
            total = head_end + 4 + length
            if len(buffer) < total:
                return
            if not head.startswith(b"http/1.1 200 ") or buffer[head_end + 4 : total] != (
                variants.EXPECTED_BODY
            ):
                self.not_ok += 1
            del buffer[:total]
            self.remaining -= 1
            if self.remaining > 0:
                assert self.transport is not None
                self.transport.write(REQUEST)
            elif self.done is not None and not self.done.done():
                self.done.set_result(None)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"server closed the connection: {exc}"))


class KeepAliveClient:
    """A fixed set of persistent connections to one server."""

    def __init__(self, connections: list[_Connection]) -> None:
        self.connections = connections

    @classmethod
    async def connect(cls, port: int, concurrency: int) -> KeepAliveClient:
        loop = asyncio.get_running_loop()
        connections = []
        for _ in range(concurrency):
            _, protocol = await loop.create_connection(_Connection, "127.0.0.1", port)
            connections.append(protocol)
        return cls(connections)

    async def run(self, requests: int) -> int:
        """Send *requests* requests spread over the connections; returns elapsed nanoseconds."""
        loop = asyncio.get_running_loop()
        share, extra = divmod(requests, len(self.connections))
        futures = []
        start = time.perf_counter_ns()
        for i, connection in enumerate(self.connections):
            count = share + (1 if i < extra else 0)
            if count:
                future: asyncio.Future[None] = loop.create_future()
                connection.send_batch(count, future)
                futures.append(future)
        await asyncio.gather(*futures)
        elapsed = time.perf_counter_ns() - start
        bad = sum(c.not_ok for c in self.connections)
        if bad:
            raise RuntimeError(f"{bad} responses were not '200 {variants.EXPECTED_BODY!r}'")
        return elapsed

    def close(self) -> None:
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="run one variant under uvicorn (child process)")
    serve_parser.add_argument("--variant", required=True)
    serve_parser.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    args = parser.parse_args(argv)
    serve(args.variant, args.loop)


if __name__ == "__main__":
    main()
