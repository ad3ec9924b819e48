"""Run the demo: the shop under uvicorn in this process, traffic at every route, the report.

The shop runs on its own event loop in a background thread (uvicorn), the traffic comes from
this thread over loopback, and the report is read from the shop's :class:`~asyncsentinel.Sentinel`
(its in-memory findings) once the shop has shut down, so shutdown-time findings are included.
Everything the shop logs (asyncsentinel's finding records with their stacks, the 500s the
misbehaving routes cause) goes to a log file whose path the report prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import uvicorn

from asyncsentinel.config import ENV_PREFIX
from asyncsentinel.demo import DemoError, load_shop
from asyncsentinel.demo.report import render_findings, render_traffic, unseen_kinds
from asyncsentinel.demo.traffic import Outcome, ProgressBar, Step, drive, plan
from asyncsentinel.findings import Finding

DEMO_SETTINGS: dict[str, float] = {
    # A second-long recursive CTE / pg_sleep is the slow query; leaks are judged quickly so the
    # demo need not wait the production defaults (5 s) before reporting them.
    "slow_query_seconds": 0.25,
    "connection_leak_seconds": 0.5,
    "task_leak_seconds": 0.5,
}
"""asyncsentinel settings the demo uses unless the ``ASYNCSENTINEL_*`` environment sets them."""

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``asyncsentinel demo`` was asked to do."""

    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    requests: int = 10
    serve: bool = False
    loop: str = "asyncio"


def sentinel_options(environ: Mapping[str, str] | None = None) -> dict[str, float]:
    """:data:`DEMO_SETTINGS` minus those the environment already sets."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in DEMO_SETTINGS.items() if ENV_PREFIX + k.upper() not in environ}


# --- logging -------------------------------------------------------------------------------------
class _ErrorMessages(logging.Handler):
    """Remembers the last ERROR records, to say why the shop failed to start."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: deque[str] = deque(maxlen=20)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def reason(self) -> str:
        """The last exception line logged, else the last message."""
        for message in reversed(self.messages):
            if "Traceback" in message:
                lines = [line for line in message.splitlines() if line.strip()]
                return lines[-1].strip() if lines else message
        return self.messages[-1] if self.messages else "no error was logged"


@contextlib.contextmanager
def _log_to_file(path: Path) -> Iterator[_ErrorMessages]:
    """Send every log record, warning and unraisable exception of the process to *path*."""
    root = logging.getLogger()
    sentinel_logger = logging.getLogger("asyncsentinel")
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    errors = _ErrorMessages()
    saved_level, saved_hook = sentinel_logger.level, sys.unraisablehook
    demo_logger = logging.getLogger("asyncsentinel.demo")

    def log_unraisable(unraisable: Any) -> None:
        # e.g. "coroutine ... was never awaited" after a MissingGreenlet: the shop's own bug.
        exc = unraisable.exc_value
        demo_logger.warning(
            "%s: %r",
            unraisable.err_msg or "Exception ignored in",
            unraisable.object,
            exc_info=(unraisable.exc_type, exc, unraisable.exc_traceback) if exc else None,
        )

    root.addHandler(file_handler)
    root.addHandler(errors)
    sentinel_logger.setLevel(logging.INFO)  # start-up advice is logged at INFO
    logging.captureWarnings(True)
    sys.unraisablehook = log_unraisable
    try:
        yield errors
    finally:
        # What the misbehaving routes left in reference cycles (a coroutine a MissingGreenlet
        # never let SQLAlchemy await) is collected now, while its warning still goes to the log.
        gc.collect()
        sys.unraisablehook = saved_hook
        logging.captureWarnings(False)
        sentinel_logger.setLevel(saved_level)
        root.removeHandler(errors)
        root.removeHandler(file_handler)
        file_handler.close()


# --- the server ----------------------------------------------------------------------------------
class _ReleaseLeaksAfterShutdown:
    """Outermost ASGI layer: once the application (and asyncsentinel's shutdown checks inside
    it) finished shutting down, release what the misbehaving routes leaked on purpose, so the
    process can exit.
    """

    def __init__(self, app: Any, release: Callable[[Any], Awaitable[None]]) -> None:
        self.app = app
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_after_release(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                try:
                    await self.release(self.app)
                except Exception:
                    logging.getLogger("asyncsentinel.demo").exception(
                        "could not release the shop's deliberate leaks"
                    )
            await send(message)

        await self.app(scope, receive, send_after_release)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to *host*:*port* (0: a free port) for the shop to serve on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DemoError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            f"choose another --port (0 picks a free one)"
        ) from None
    return sock


class ShopServer:
    """uvicorn serving the shop on a background thread, on an already bound socket."""

    def __init__(
        self,
        app: Any,
        release: Callable[[Any], Awaitable[None]],
        sock: socket.socket,
        loop: str = "asyncio",
    ) -> None:
        host, self.port = sock.getsockname()[:2]
        host = f"[{host}]" if sock.family == socket.AF_INET6 else host
        self.base_url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            _ReleaseLeaksAfterShutdown(app, release),
            loop=loop,
            lifespan="on",
            log_config=None,  # records go to the demo's log file
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="shop-server", daemon=True
        )
        self._socket = sock

    def start(self, errors: _ErrorMessages) -> None:
        """Start serving; waits until the application's start-up has completed."""
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DemoError(f"the shop did not start: {errors.reason()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Shut down (runs the lifespan shutdown) and wait for the server thread."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(STOP_TIMEOUT_SECONDS)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)
        self._socket.close()


# --- the run -------------------------------------------------------------------------------------
def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _wait(seconds: float | None) -> None:
    """Sleep *seconds* (forever if ``None``), interruptible by Ctrl-C and SIGTERM."""
    previous = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if seconds is None:
            while True:
                time.sleep(3600)
        time.sleep(seconds)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def run(options: DemoOptions, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the demo; returns the process exit status (0 ok, 1 a healthy route failed, 130
    interrupted before the report). Raises :class:`DemoError` when it cannot run at all.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    shop = load_shop()
    sock = listen(options.host, options.port)
    log_path = Path(tempfile.mkdtemp(prefix="asyncsentinel-demo-")) / "demo.log"

    with _log_to_file(log_path) as errors:
        try:
            app = shop.create_app(options.database_url, **sentinel_options())
        except ValueError as exc:
            sock.close()
            raise DemoError(f"--database-url: {exc}") from None
        sentinel = app.state.asyncsentinel
        try:
            server = ShopServer(app, shop.release_deliberate_leaks, sock, options.loop)
            err.write("Starting the example shop...\n")
            try:
                server.start(errors)
            except DemoError as exc:
                raise DemoError(f"{exc} (full log: {log_path})") from None
            database = app.state.database_url.render_as_string(hide_password=True)
            err.write(f"Shop at {server.base_url} on {database}\n")
            try:
                session = _Session(server.base_url, sentinel, log_path, out, err)
                status = session.exercise(plan(options.requests), serve=options.serve)
            finally:
                err.write("Stopping the shop...\n")
                server.stop()
        finally:
            findings = sentinel.findings()
            sentinel.close()
    return session.conclude(findings, status)


class _Session:
    """One demo run against a started shop: traffic, the wait for late findings, the reports."""

    def __init__(self, base: str, sentinel: Any, log_path: Path, out: TextIO, err: TextIO):
        self.base, self.sentinel, self.log_path = base, sentinel, log_path
        self.out, self.err = out, err
        self.outcomes: list[Outcome] = []
        self.reported: list[Finding] | None = None  # what --serve printed before serving

    def exercise(self, steps: list[Step], *, serve: bool) -> int:
        """Drive the traffic (and serve until Ctrl-C with *serve*); returns the exit status."""
        healthy = sum(s.healthy for s in steps)
        self.err.write(
            f"Driving traffic at {len(steps)} routes ({healthy} healthy, "
            f"{len(steps) - healthy} misbehaving):\n"
        )
        progress = ProgressBar(sum(s.count for s in steps), self.err)
        try:
            self.outcomes = asyncio.run(drive(self.base, steps, progress))
            settings = self.sentinel.settings
            late = max(settings.connection_leak_seconds, settings.task_leak_seconds) + 1.0
            progress.start(f"waiting {late:.1f} s for leak detectors")
            _wait(late)
            progress.finish()
        except KeyboardInterrupt:
            progress.finish()
            self.err.write("Interrupted.\n")
            return 130
        if serve:
            self.reported = self.sentinel.findings()
            self.out.write(self._report(self.reported, shutdown_pending=True))
            self.out.write(
                f"\nServing the shop at {self.base}; Prometheus can scrape {self.base}/metrics.\n"
                f"Press Ctrl-C to stop (findings at shutdown are reported then).\n"
            )
            self.out.flush()
            with contextlib.suppress(KeyboardInterrupt):
                _wait(None)
        return 0

    def conclude(self, findings: list[Finding], status: int) -> int:
        """Print the report (after shutdown, so shutdown-time findings are in it)."""
        if self.reported is not None:
            already = {id(f) for f in self.reported}
            later = [f for f in findings if id(f) not in already]
            self.out.write(render_findings(later, "\nasyncsentinel findings at shutdown") + "\n")
        else:
            self.out.write(self._report(findings))
            self.out.write(
                f"\nMetrics were served at {self.base}/metrics while the shop ran; "
                f"`asyncsentinel demo --serve` keeps them up for Prometheus.\n"
            )
        self.out.flush()
        failed = [o for o in self.outcomes if o.step.healthy and o.failed]
        for outcome in failed:
            self.err.write(
                f"error: healthy route {outcome.step.label} failed; see {self.log_path}\n"
            )
        return 1 if failed and status == 0 else status

    def _report(self, findings: list[Finding], *, shutdown_pending: bool = False) -> str:
        parts = ["", "Traffic", "", render_traffic(self.outcomes), ""]
        if any(o.failed for o in self.outcomes if not o.step.healthy):
            parts += [
                "  Errors of misbehaving routes are the bugs themselves (MissingGreenlet, a",
                "  session used concurrently, a pool timeout); the log has their tracebacks.",
                "",
            ]
        parts.append(render_findings(findings, "asyncsentinel findings"))
        missing = unseen_kinds(findings)
        if missing:
            note = " (some are only found when the shop shuts down)" if shutdown_pending else ""
            parts += ["", f"  Not seen in this run: {', '.join(missing)}{note}"]
        parts += ["", f"Every finding's log record, with its stack: {self.log_path}"]
        return "\n".join(parts) + "\n"
