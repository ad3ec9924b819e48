"""The catalogue of measurements (observations) detectors record.

Detectors never talk to Prometheus: they call ``Dispatcher.record(INSTRUMENT, value, labels)``
with one of the instruments below and label values in the instrument's label order. The
Prometheus sink turns each instrument into one metric family. Names follow the OpenTelemetry
semantic conventions where one exists, translated the way OpenTelemetry's Prometheus exporter
does it (dots become underscores, the unit becomes a suffix, counters end in ``_total``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "histogram", "gauge"]
MultiprocessMode = Literal["livesum", "livemax", "livemin", "sum", "max", "min", "mostrecent"]

# OpenTelemetry's recommended boundaries for http.server.request.duration.
HTTP_DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
# OpenTelemetry's recommended boundaries for db.client.operation.duration, plus finer low end.
DB_DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
WAIT_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUERY_COUNT_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100, 250, 1000)


@dataclass(frozen=True, slots=True)
class Instrument:
    """One measurement: its exposition name, kind, help text, label names and buckets.

    ``name`` is the full Prometheus name as scraped (counters include ``_total``).
    For gauges, ``record`` adds a delta (up/down counter); use ``Dispatcher.set`` for levels.
    """

    name: str
    kind: Kind
    documentation: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    multiprocess_mode: MultiprocessMode = "livesum"
    """How prometheus_client multiprocess mode combines the gauge across worker processes."""


# --- HTTP server -------------------------------------------------------------------------------
HTTP_SERVER_REQUEST_DURATION = Instrument(
    "http_server_request_duration_seconds",
    "histogram",
    "Duration of HTTP server requests, until the last body chunk was sent.",
    ("http_request_method", "http_route", "http_response_status_code"),
    HTTP_DURATION_BUCKETS,
)
HTTP_SERVER_ACTIVE_REQUESTS = Instrument(
    "http_server_active_requests",
    "gauge",
    "Number of HTTP server requests being handled.",
    ("http_request_method",),
)

# --- asyncsentinel itself -------------------------------------------------------------------------
FINDINGS = Instrument(
    "asyncsentinel_findings_total",
    "counter",
    "Findings reported by asyncsentinel detectors, by kind and the route they happened on.",
    ("kind", "http_route"),
)
INSTRUMENTATION_ERRORS = Instrument(
    "asyncsentinel_instrumentation_errors_total",
    "counter",
    "Errors raised inside asyncsentinel itself; contained, never raised into the application.",
    ("component",),
)

# --- database client ------------------------------------------------------------------------------
DB_OPERATION_DURATION = Instrument(
    "db_client_operation_duration_seconds",
    "histogram",
    "Duration of database client operations (one SQL statement).",
    ("db_system_name", "db_operation_name", "db_client_connection_pool_name"),
    DB_DURATION_BUCKETS,
)
REQUEST_DB_QUERIES = Instrument(
    "asyncsentinel_request_db_queries",
    "histogram",
    "Database statements executed per HTTP request.",
    ("http_route",),
    QUERY_COUNT_BUCKETS,
)
DB_CONNECTION_COUNT = Instrument(
    "db_client_connection_count",
    "gauge",
    "Connections in the pool by state: idle (checked in) or used (checked out).",
    ("db_client_connection_pool_name", "db_client_connection_state"),
)
DB_CONNECTION_MAX = Instrument(
    "db_client_connection_max",
    "gauge",
    "Maximum number of connections the pool allows (pool_size + max_overflow).",
    ("db_client_connection_pool_name",),
)
DB_CONNECTION_PENDING_REQUESTS = Instrument(
    "db_client_connection_pending_requests",
    "gauge",
    "Tasks or threads waiting for a connection from the pool.",
    ("db_client_connection_pool_name",),
)
DB_CONNECTION_TIMEOUTS = Instrument(
    "db_client_connection_timeouts_total",
    "counter",
    "Checkouts that gave up waiting for a pooled connection.",
    ("db_client_connection_pool_name",),
)
DB_CONNECTION_WAIT_TIME = Instrument(
    "db_client_connection_wait_time_seconds",
    "histogram",
    "Time it took to obtain a connection from the pool.",
    ("db_client_connection_pool_name",),
    WAIT_BUCKETS,
)
DB_CONNECTION_USE_TIME = Instrument(
    "db_client_connection_use_time_seconds",
    "histogram",
    "Time between checking a connection out of the pool and returning it.",
    ("db_client_connection_pool_name",),
    WAIT_BUCKETS,
)
DB_CONNECTION_CREATE_TIME = Instrument(
    "db_client_connection_create_time_seconds",
    "histogram",
    "Time it took to open a new database connection.",
    ("db_client_connection_pool_name",),
    WAIT_BUCKETS,
)

# --- event loop, tasks, thread pool ---------------------------------------------------------------
EVENT_LOOP_LAG = Instrument(
    "asyncsentinel_event_loop_lag_seconds",
    "histogram",
    "Delay between when a heartbeat callback was due on the event loop and when it ran.",
    (),
    LAG_BUCKETS,
)
EVENT_LOOP_BLOCKED = Instrument(
    "asyncsentinel_event_loop_blocked_seconds",
    "histogram",
    "Duration of incidents in which the event loop did not run any other callback.",
    ("http_route",),
    LAG_BUCKETS,
)
ASYNCIO_TASKS = Instrument(
    "asyncsentinel_asyncio_tasks",
    "gauge",
    "Live asyncio tasks on the instrumented event loop.",
)
THREAD_POOL_QUEUED = Instrument(
    "asyncsentinel_thread_pool_queued_tasks",
    "gauge",
    "Work items waiting for a thread in the event loop's default executor (asyncio.to_thread).",
)
THREAD_POOL_BUSY = Instrument(
    "asyncsentinel_thread_pool_busy_threads",
    "gauge",
    "Threads of the event loop's default executor running a work item.",
)
THREAD_POOL_MAX = Instrument(
    "asyncsentinel_thread_pool_max_threads",
    "gauge",
    "Maximum number of threads of the event loop's default executor.",
    multiprocess_mode="livesum",
)

# --- HTTP client (aiohttp) ------------------------------------------------------------------------
HTTP_CLIENT_REQUEST_DURATION = Instrument(
    "http_client_request_duration_seconds",
    "histogram",
    "Duration of outgoing HTTP client requests.",
    ("http_request_method", "server_address", "http_response_status_code"),
    HTTP_DURATION_BUCKETS,
)
HTTP_CLIENT_CONNECTION_WAIT_TIME = Instrument(
    "http_client_connection_wait_time_seconds",
    "histogram",
    "Time a client request waited for a free connection slot in the connector (limit reached).",
    ("server_address",),
    WAIT_BUCKETS,
)
HTTP_CLIENT_CONNECTIONS = Instrument(
    "asyncsentinel_http_client_connections_total",
    "counter",
    "Connections obtained by the HTTP client, by whether they were newly created or reused.",
    ("server_address", "state"),
)
HTTP_CLIENT_DNS_CACHE = Instrument(
    "asyncsentinel_http_client_dns_cache_total",
    "counter",
    "DNS cache lookups of the HTTP client, by result (hit or miss).",
    ("result",),
)

ALL_INSTRUMENTS: tuple[Instrument, ...] = tuple(
    value for value in list(globals().values()) if isinstance(value, Instrument)
)
