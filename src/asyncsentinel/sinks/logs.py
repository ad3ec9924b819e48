"""Logging sink: one record per finding on the ``asyncsentinel`` logger, rate-limited.

The message names the kind, the route and the culprit ``file:line in function`` and, when the
detector captured a stack, ends with the stack formatted like a traceback with source lines.
Identical findings (same kind, route and culprit) are logged at most once per
``log_rate_limit_seconds``; the next record says how many were suppressed. Metrics still count
every one. The finding is attached to the record as ``record.asyncsentinel`` (a dict) for
structured/JSON log formatters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from asyncsentinel.findings import Finding
from asyncsentinel.frames import format_stack

logger = logging.getLogger("asyncsentinel")

_MAX_TRACKED_KEYS = 10_000


def format_finding(finding: Finding) -> str:
    """The human-readable text of a finding, as logged."""
    where = (
        f"{finding.http_method} {finding.http_route}" if finding.http_route else "outside a request"
    )
    culprit = str(finding.culprit) if finding.culprit else "unknown location"
    text = f"asyncsentinel {finding.kind} on {where} at {culprit}: {finding.message}"
    if finding.stack:
        text += "\nStack (most recent call last):\n" + format_stack(finding.stack)
    return text


class LogSink:
    """Writes findings to the ``asyncsentinel`` logger with per-finding rate limiting."""

    def __init__(self, *, rate_limit_seconds: float = 60.0, log: logging.Logger = logger) -> None:
        self._interval = rate_limit_seconds
        self._log = log
        # dedupe key -> (time of last record, findings suppressed since); LRU-bounded.
        self._seen: OrderedDict[tuple[str, str, str], tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def emit(self, finding: Finding) -> None:
        level = finding.severity.log_level
        if not self._log.isEnabledFor(level):
            return
        key = finding.dedupe_key
        now = time.monotonic()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self._interval:
                self._seen[key] = (last[0], last[1] + 1)
                self._seen.move_to_end(key)
                return
            suppressed = last[1] if last is not None else 0
            self._seen[key] = (now, 0)
            self._seen.move_to_end(key)
            while len(self._seen) > _MAX_TRACKED_KEYS:
                self._seen.popitem(last=False)
        text = format_finding(finding)
        if suppressed:
            text += (
                f"\n({suppressed} identical findings were not logged "
                f"in the last {self._interval:g}s)"
            )
        self._log.log(level, "%s", text, extra={"asyncsentinel": finding.as_dict()})
