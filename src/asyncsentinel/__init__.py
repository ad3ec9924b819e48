"""asyncsentinel: finds, at run time, the mistakes that take async Python backends down.

Two lines for a FastAPI/Starlette app::

    import asyncsentinel
    sentinel = asyncsentinel.instrument(app)
"""

from __future__ import annotations

from asyncsentinel.asgi import SentinelMiddleware
from asyncsentinel.config import ConfigError, Settings
from asyncsentinel.findings import (
    ALL_KINDS,
    CANCELLATION_SWALLOWED,
    CLIENT_SESSION_PER_REQUEST,
    CLIENT_SESSION_UNCLOSED,
    CONNECTION_LEAKED,
    DB_CONFIGURATION_ADVICE,
    ENGINE_CREATED_IN_REQUEST,
    EVENT_LOOP_BLOCKED,
    LAZY_LOAD_IN_ASYNC,
    N_PLUS_ONE,
    POOL_EXHAUSTED,
    POOL_NOT_DISPOSED,
    SESSION_SHARED_ACROSS_TASKS,
    SLOW_QUERY,
    SYNC_DB_ON_EVENT_LOOP,
    TASK_EXCEPTION_UNRETRIEVED,
    TASK_LEAKED,
    Finding,
    Severity,
)
from asyncsentinel.frames import Location
from asyncsentinel.sentinel import Sentinel, instrument
from asyncsentinel.sources.loop import LoopMonitor

__version__ = "0.1.0"


class AsyncSentinelWarning(UserWarning):
    """Warnings asyncsentinel itself issues (tests run with these as errors)."""


__all__ = [
    "ALL_KINDS",
    "CANCELLATION_SWALLOWED",
    "CLIENT_SESSION_PER_REQUEST",
    "CLIENT_SESSION_UNCLOSED",
    "CONNECTION_LEAKED",
    "DB_CONFIGURATION_ADVICE",
    "ENGINE_CREATED_IN_REQUEST",
    "EVENT_LOOP_BLOCKED",
    "LAZY_LOAD_IN_ASYNC",
    "N_PLUS_ONE",
    "POOL_EXHAUSTED",
    "POOL_NOT_DISPOSED",
    "SESSION_SHARED_ACROSS_TASKS",
    "SLOW_QUERY",
    "SYNC_DB_ON_EVENT_LOOP",
    "TASK_EXCEPTION_UNRETRIEVED",
    "TASK_LEAKED",
    "AsyncSentinelWarning",
    "ConfigError",
    "Finding",
    "Location",
    "LoopMonitor",
    "Sentinel",
    "SentinelMiddleware",
    "Settings",
    "Severity",
    "__version__",
    "instrument",
]
