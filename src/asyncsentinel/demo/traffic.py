"""The demo's traffic: which routes of the shop to call, how often, and a progress bar."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

PRODUCTS = 6
CUSTOMERS = 8
ORDERS = 40


@dataclass(frozen=True, slots=True)
class Step:
    """Requests to one route: ``count`` of them, ``concurrency`` at a time."""

    method: str
    route: str
    """The route template (what asyncsentinel reports as ``http_route``); ids are filled in."""
    count: int
    healthy: bool
    concurrency: int = 1
    body: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """``METHOD /route/{template}``."""
        return f"{self.method} {self.route}"

    def path(self, i: int) -> str:
        """The concrete path of the *i*-th request (ids rotate over the seeded rows)."""
        return self.route.format(
            product_id=i % PRODUCTS + 1, customer_id=i % CUSTOMERS + 1, order_id=i % ORDERS + 1
        )


def plan(requests: int, *, pool_size: int = 2) -> list[Step]:
    """Healthy routes get *requests* calls each; misbehaving ones at most that (slow ones fewer).

    Order matters: the healthy controls run first and alone, so they cannot be slowed down by
    the misbehaving routes; ``/bad/hold-connection`` is called ``2 * pool_size + 1`` times at
    once to drain the pool; ``/bad/leak-connection`` runs last because it keeps one of the pool's
    connections for good.
    """
    n = requests

    def healthy(route: str, count: int = n, method: str = "GET", **kw: Any) -> Step:
        return Step(method, route, count, healthy=True, **kw)

    def bad(route: str, at_most: int, **kw: Any) -> Step:
        return Step("GET", "/bad" + route, min(n, at_most), healthy=False, **kw)

    burst = 2 * pool_size + 1
    return [
        healthy("/health"),
        healthy("/products"),
        healthy("/products/{product_id}"),
        healthy("/customers/{customer_id}/orders"),
        healthy("/orders", method="POST", body={"customer_id": 1, "product_id": 2, "quantity": 1}),
        healthy("/customers/{customer_id}/dashboard"),
        healthy("/products/{product_id}/stock"),
        healthy("/reports/sales.csv"),
        healthy("/products/{product_id}/quote", count=min(n, 2)),
        healthy("/products/{product_id}/restock-eta", count=min(n, 2)),
        bad("/orders-per-row", 3),
        bad("/customers-lazy-orders", 3),
        bad("/slow-report", 1),
        Step("GET", "/bad/hold-connection", burst, healthy=False, concurrency=burst),
        bad("/global-session", 3),
        bad("/sync-engine", 3),
        bad("/engine-per-request", 3),
        bad("/undisposed-engine", 1),
        bad("/lazy-load/{order_id}", 3),
        bad("/blocking-sleep", 2),
        bad("/cpu-loop", 2),
        bad("/blocking-read", 2),
        bad("/fire-and-forget/{customer_id}", 3),
        bad("/swallow-cancel/{product_id}", 2),
        bad("/task-exception/{customer_id}", 3),
        bad("/session-per-request/{product_id}", 3),
        bad("/unclosed-client-session/{product_id}", 1),
        bad("/leak-connection", 1),
    ]


@dataclass
class Outcome:
    """What one route answered: status codes (``"error"`` for a transport failure)."""

    step: Step
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        """Answers that were not 2xx."""
        return sum(c for s, c in self.statuses.items() if not s.startswith("2"))


class ProgressBar:
    """A one-line text progress bar on a terminal; one line per route when not a terminal."""

    def __init__(self, total: int, stream: TextIO, width: int = 28) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self._label = ""

    def _line(self) -> str:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {self.done:>4}/{self.total} {self._label}"

    def start(self, label: str) -> None:
        """A new phase begins (e.g. the next route)."""
        if not self.tty and self._label:
            self.stream.write(self._line() + "\n")
        self._label = label
        self._draw()

    def advance(self, n: int = 1) -> None:
        """*n* more units of work are done."""
        self.done = min(self.total, self.done + n)
        self._draw()

    def _draw(self) -> None:
        if self.tty:
            columns = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + self._line()[: columns - 1].ljust(columns - 1))
            self.stream.flush()

    def finish(self) -> None:
        """End the bar (leaves the final state on its own line)."""
        if self.tty:
            self.stream.write("\n")
        elif self._label:
            self.stream.write(self._line() + "\n")
        self._label = ""
        self.stream.flush()


async def drive(base_url: str, steps: list[Step], progress: ProgressBar) -> list[Outcome]:
    """Send every step's requests, one route after the other; returns what each answered."""
    # No keep-alive: a request that fails with a 500 makes the server drop its connection, and a
    # reused connection would then fail on the client side instead of reaching the next route.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0, limits=limits) as client:
        outcomes = []
        for step in steps:
            progress.start(step.label)
            outcomes.append(await _send(client, step, progress))
    return outcomes


async def _send(client: httpx.AsyncClient, step: Step, progress: ProgressBar) -> Outcome:
    outcome = Outcome(step)
    semaphore = asyncio.Semaphore(step.concurrency)

    async def one(i: int) -> None:
        async with semaphore:
            try:
                response = await client.request(step.method, step.path(i), json=step.body)
                outcome.statuses[str(response.status_code)] += 1
            except httpx.HTTPError:
                outcome.statuses["error"] += 1
        progress.advance()

    async with asyncio.TaskGroup() as tg:
        for i in range(step.count):
            tg.create_task(one(i))
    return outcome
