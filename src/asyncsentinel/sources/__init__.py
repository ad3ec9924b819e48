"""Signal sources: each knows one library (SQLAlchemy, asyncpg, aiohttp, the event loop, tasks).

A source receives the validated :class:`~asyncsentinel.config.Settings` and the
:class:`~asyncsentinel.findings.Dispatcher`; it creates findings and records observations and
never imports a sink.
"""

from __future__ import annotations

from typing import ClassVar

from asyncsentinel.config import Settings
from asyncsentinel.context import RequestState
from asyncsentinel.findings import Dispatcher


class Source:
    """Base class of a signal source. Override what the source needs; the rest is a no-op.

    Life cycle: :meth:`install` when the Sentinel is created (register listeners),
    :meth:`start` / :meth:`stop` with the application's lifespan (the event loop is running),
    :meth:`uninstall` on :meth:`Sentinel.close`. :meth:`request_started` and
    :meth:`request_finished` run for every HTTP request, so keep them cheap; the base class
    versions are skipped entirely.
    """

    name: ClassVar[str] = "source"

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher

    def install(self) -> None:
        """Register listeners; called once when the Sentinel is created."""

    def uninstall(self) -> None:
        """Remove everything :meth:`install` registered."""

    async def start(self) -> None:
        """Start background work; runs at application start-up on the running loop."""

    async def stop(self) -> None:
        """Stop background work and run shutdown checks; runs at application shutdown."""

    def request_started(self, state: RequestState) -> None:
        """A request began (its route may not be known yet)."""

    def request_finished(self, state: RequestState) -> None:
        """A request's handler and background tasks returned; ``state.route`` is final."""
