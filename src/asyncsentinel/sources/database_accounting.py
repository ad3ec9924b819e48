"""Database bookkeeping shared by the SQLAlchemy and asyncpg sources (no driver imported here).

* :class:`PoolStats` — the live state of one connection pool (used, idle, waiting), fed to the
  ``db_client_connection_*`` instruments: levels read when the sinks report (recorded as deltas
  where they cannot read them), so two pools sharing a name (an engine's pool before and after
  ``dispose()``) add up instead of overwriting each other.
* :class:`Checkout` — one connection checked out of a pool: when, by which request and line.
* :class:`StatementShapes` — per pool, each statement text's shape and the recorder of its
  ``db_client_operation_duration_seconds`` series.
* :class:`RequestDb` — what one HTTP request did with the database, in ``RequestState.db``
  (shared by every database source): statement count and time, executions per statement shape
  (for N+1 detection), connections it checked out (for leak detection).

:class:`~asyncsentinel.sources.database.DatabaseMonitor` turns them into request metrics, span
attributes and findings.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from asyncsentinel.context import RequestState
from asyncsentinel.findings import Dispatcher, EvidenceValue
from asyncsentinel.frames import Location, Origin, origin_location
from asyncsentinel.instruments import (
    DB_CONNECTION_COUNT,
    DB_CONNECTION_CREATE_TIME,
    DB_CONNECTION_MAX,
    DB_CONNECTION_PENDING_REQUESTS,
    DB_CONNECTION_TIMEOUTS,
    DB_CONNECTION_USE_TIME,
    DB_CONNECTION_WAIT_TIME,
    DB_OPERATION_DURATION,
    Instrument,
)
from asyncsentinel.sources.sql_shapes import describe

MAX_SHAPES_PER_REQUEST = 256
"""Distinct statement shapes counted per request; later new shapes are not tracked (memory)."""
MAX_CHECKOUTS_PER_REQUEST = 64
"""Checkouts remembered per request for leak detection."""
MAX_NAME_CHARS = 200
"""Longest pool name used as a label value."""
MAX_STATEMENTS_PER_POOL = 2048
"""Statement texts whose shape is remembered per pool (cleared when full)."""

Recorder = Callable[[float], None]
RecorderFactory = Callable[[Instrument, tuple[str, ...]], Recorder]
""":meth:`Dispatcher.recorder <asyncsentinel.findings.Dispatcher.recorder>`."""


class StatementShapes:
    """Statement text -> its shape and the recorder of its ``db_client_operation_duration_seconds``
    series, for one pool.

    One dictionary lookup for statements seen before: SQLAlchemy's compiled cache and
    applications' constant query strings hand the same texts over and over, and a recorder is
    bound once per operation name. Bounded; cleared when full.
    """

    __slots__ = ("_bind", "_durations", "backslash", "known", "name", "system")

    def __init__(
        self, system: str, name: str, bind: RecorderFactory, *, backslash: bool = False
    ) -> None:
        self.system = system
        """``db.system.name`` as the semantic conventions spell it (``postgresql``, ``sqlite``)."""
        self.name = name
        self.backslash = backslash
        """String literals use backslash escapes (MySQL/MariaDB)."""
        self._bind = bind
        self.known: dict[str, tuple[str, Recorder]] = {}
        """Statement text -> (shape, recorder) for texts seen (read directly on hot paths)."""
        self._durations: dict[str, Recorder] = {}

    def shape_of(self, statement: str) -> tuple[str, Recorder]:
        """The shape of *statement* and the recorder of its duration series (seconds)."""
        known = self.known.get(statement)
        if known is not None:
            return known
        shape, operation = describe(statement, backslash_escapes=self.backslash)
        record = self._durations.get(operation)
        if record is None:
            record = self._bind(DB_OPERATION_DURATION, (self.system, operation, self.name))
            if len(self._durations) >= MAX_STATEMENTS_PER_POOL:
                self._durations.clear()
            self._durations[operation] = record
        known = (shape, record)
        if len(self.known) >= MAX_STATEMENTS_PER_POOL:
            self.known.clear()
        self.known[statement] = known
        return known

    def rename(self, name: str) -> None:
        """Record under pool name *name* from now on."""
        self.name = name
        self.known = {}
        self._durations = {}


def _level_of(stats: weakref.ref[PoolStats], attribute: str) -> Callable[[], float | None]:
    def read() -> float | None:
        owner = stats()
        return None if owner is None else float(getattr(owner, attribute))

    return read


class PoolStats:
    """The live state of one connection pool, recorded into the pool instruments.

    The levels (used, idle, pending) are plain counters that the sinks read when they report
    (:meth:`Dispatcher.level`): a checkout and its checkin change them six times, and recording
    each change cost more than the rest of a checkout's accounting. Where a sink cannot read
    levels (prometheus_client's multiprocess mode: another process collects, from files) each
    change is recorded as an exact delta instead. The durations are bound once per pool name
    (:meth:`Dispatcher.recorder`).
    """

    __slots__ = (
        "__weakref__",
        "_create_time",
        "_deltas",
        "_dispatcher",
        "_idle",
        "_labels",
        "_level_readers",
        "_pending",
        "_timeouts",
        "_use_time",
        "_used",
        "_wait_time",
        "idle",
        "maximum",
        "name",
        "used",
        "waiting",
    )

    def __init__(self, dispatcher: Dispatcher, name: str, maximum: int | None = None) -> None:
        self._dispatcher = dispatcher
        self.used = 0
        """Connections checked out now."""
        self.idle = 0
        """Open connections resting in the pool."""
        self.waiting = 0
        """Callers inside a checkout right now."""
        self.maximum = maximum
        self._level_readers: Callable[[], None] | None = None
        self._set_name(name)
        if maximum is not None:
            dispatcher.set(DB_CONNECTION_MAX, maximum, self._labels)

    def _set_name(self, name: str) -> None:
        self.name = name
        labels = self._labels = (name,)
        dispatcher = self._dispatcher
        bind = dispatcher.recorder
        self._used = bind(DB_CONNECTION_COUNT, (name, "used"))
        self._idle = bind(DB_CONNECTION_COUNT, (name, "idle"))
        self._pending = bind(DB_CONNECTION_PENDING_REQUESTS, labels)
        self._wait_time = bind(DB_CONNECTION_WAIT_TIME, labels)
        self._use_time = bind(DB_CONNECTION_USE_TIME, labels)
        self._create_time = bind(DB_CONNECTION_CREATE_TIME, labels)
        self._timeouts = bind(DB_CONNECTION_TIMEOUTS, labels)
        if self._level_readers is not None:
            self._level_readers()  # stop reporting under the previous name
        me = weakref.ref(self)
        levels = [
            dispatcher.level(DB_CONNECTION_COUNT, (name, "used"), _level_of(me, "used")),
            dispatcher.level(DB_CONNECTION_COUNT, (name, "idle"), _level_of(me, "idle")),
            dispatcher.level(DB_CONNECTION_PENDING_REQUESTS, labels, _level_of(me, "waiting")),
        ]
        removers = [remove for remove in levels if remove is not None]
        self._deltas = len(removers) < len(levels)
        if self._deltas:
            for remove in removers:
                remove()
            self._level_readers = None
        else:

            def stop_reporting() -> None:
                for remove in removers:
                    remove()

            self._level_readers = stop_reporting

    def rename(self, name: str) -> None:
        """Move this pool's current levels to a new name (``instrument_engine(name=...)``)."""
        if name == self.name:
            return
        if self._deltas:
            self._used(-self.used)
            self._idle(-self.idle)
            self._pending(-self.waiting)
        self._set_name(name)
        if self._deltas:
            self._used(self.used)
            self._idle(self.idle)
            self._pending(self.waiting)
        if self.maximum is not None:
            self._dispatcher.set(DB_CONNECTION_MAX, self.maximum, self._labels)

    def wait_started(self) -> None:
        """A caller asks the pool for a connection."""
        self.waiting += 1
        if self._deltas:
            self._pending(1)

    def wait_ended(self) -> None:
        """The caller got a connection, or gave up."""
        self.waiting -= 1
        if self._deltas:
            self._pending(-1)

    def checked_out(self, *, from_idle: bool, wait_seconds: float) -> None:
        """A connection left the pool (*from_idle*: an open one; otherwise newly opened)."""
        self.used += 1
        if from_idle:
            self.idle -= 1
        if self._deltas:
            self._used(1)
            if from_idle:
                self._idle(-1)
        self._wait_time(wait_seconds)

    def checked_in(self, *, use_seconds: float | None, to_idle: bool) -> None:
        """A connection came back (*to_idle*: still open and kept by the pool)."""
        self.used -= 1
        if to_idle:
            self.idle += 1
        if self._deltas:
            self._used(-1)
            if to_idle:
                self._idle(1)
        if use_seconds is not None:
            self._use_time(use_seconds)

    def idle_closed(self) -> None:
        """An idle connection was closed (dispose, recycle, failed pre-ping, overflow)."""
        self.idle -= 1
        if self._deltas:
            self._idle(-1)

    def set_levels(self, used: int, idle: int) -> None:
        """Set used/idle from the pool's own counters (pools that expose them exactly)."""
        if self._deltas:
            if used != self.used:
                self._used(used - self.used)
            if idle != self.idle:
                self._idle(idle - self.idle)
        self.used = used
        self.idle = idle

    def wait_observed(self, wait_seconds: float) -> None:
        """Record the time a checkout took (pools whose levels come from :meth:`set_levels`)."""
        self._wait_time(wait_seconds)

    def use_observed(self, use_seconds: float) -> None:
        """Record how long a connection was held (pools using :meth:`set_levels`)."""
        self._use_time(use_seconds)

    def timed_out(self) -> None:
        """A checkout gave up waiting."""
        self._timeouts(1)

    def created(self, seconds: float) -> None:
        """A new connection was opened in *seconds*."""
        self._create_time(seconds)


class Checkout:
    """One connection out of its pool: since when, for which request, checked out where."""

    __slots__ = ("_culprit", "origin", "request", "returned", "start_ns", "stats", "still_out")

    def __init__(
        self,
        stats: PoolStats,
        start_ns: int,
        request: RequestState | None,
        culprit: Location | None = None,
        still_out: Callable[[], bool] | None = None,
    ) -> None:
        self.stats = stats
        self.start_ns = start_ns
        self.request = request
        self._culprit = culprit
        self.origin: Origin | None = None
        """Where the connection was checked out (the innermost user-code frame); turned into
        :attr:`culprit` only if a leak is reported."""
        self.returned = False
        self.still_out = still_out
        """Extra check for pools that can take a connection back without telling us."""

    @property
    def culprit(self) -> Location | None:
        """The user-code line that checked the connection out, when known."""
        if self._culprit is None and self.origin is not None:
            self._culprit = origin_location(self.origin)
        return self._culprit

    @culprit.setter
    def culprit(self, value: Location | None) -> None:
        self._culprit = value

    def is_out(self) -> bool:
        """True while the connection has not come back to its pool."""
        if self.returned:
            return False
        return self.still_out() if self.still_out is not None else True


class RequestDb:
    """What one HTTP request did with the database.

    Created at a request's first statement or checkout; the collections only some requests
    need (N+1 flags, checkouts, findings reported once) are created on first use.
    """

    __slots__ = ("checkouts", "count", "duration_ns", "flagged", "owner", "reported", "shapes")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        """The monitor that counts statements for this request (one, even if several exist)."""
        self.count = 0
        self.duration_ns = 0
        self.shapes: dict[str, int] = {}
        self.flagged: dict[str, tuple[tuple[Location, ...], dict[str, EvidenceValue]]] | None = None
        """Shapes that reached the N+1 threshold: the stack at that moment, and evidence."""
        self.checkouts: list[Checkout] | None = None
        """Connections checked out during the request (at most ``MAX_CHECKOUTS_PER_REQUEST``)."""
        self.reported: set[str] | None = None
        """Findings already reported for this request (e.g. one pool_exhausted per pool)."""

    def remember_checkout(self, checkout: Checkout) -> bool:
        """Keep *checkout* for the leak check at the request's end; ``False`` when full."""
        checkouts = self.checkouts
        if checkouts is None:
            checkouts = self.checkouts = []
        elif len(checkouts) >= MAX_CHECKOUTS_PER_REQUEST:
            return False
        checkouts.append(checkout)
        return True

    def first_time(self, key: str) -> bool:
        """``True`` the first time *key* is asked about in this request (report once)."""
        reported = self.reported
        if reported is None:
            reported = self.reported = set()
        elif key in reported:
            return False
        reported.add(key)
        return True

    def add(self, shape: str, duration_ns: int) -> int:
        """Count one statement; returns how often its shape ran in this request (0: untracked)."""
        self.count += 1
        self.duration_ns += duration_ns
        shapes = self.shapes
        seen = shapes.get(shape)
        if seen is None:
            if len(shapes) >= MAX_SHAPES_PER_REQUEST:
                return 0
            seen = 0
        seen += 1
        shapes[shape] = seen
        return seen
