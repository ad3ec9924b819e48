"""In-memory sink: a bounded ring buffer of recent findings, for tests, the demo and reports."""

from __future__ import annotations

import threading
from collections import deque

from asyncsentinel.findings import Finding


class MemorySink:
    """Keeps the most recent ``capacity`` findings; older ones are dropped first."""

    def __init__(self, capacity: int = 1000) -> None:
        self._buffer: deque[Finding] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def emit(self, finding: Finding) -> None:
        with self._lock:
            self._buffer.append(finding)

    def findings(self, kind: str | None = None, *, http_route: str | None = None) -> list[Finding]:
        """Recent findings, oldest first, optionally only of one kind and/or route."""
        with self._lock:
            items = list(self._buffer)
        return [
            f
            for f in items
            if (kind is None or f.kind == kind)
            and (http_route is None or f.http_route == http_route)
        ]

    def clear(self) -> None:
        with self._lock:
            self._buffer.clear()
