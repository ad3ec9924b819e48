"""Why asyncsentinel adds more microseconds per statement on PostgreSQL than on in-memory SQLite.

``python benchmarks/db_round_trips.py [--quick] [--rounds N] [--postgres URL]`` answers with
two measurements, each a median of paired per-round differences to no instrumentation (variants
interleaved, order rotated every round, as in ``db_overhead.py``):

1. **Same work, different surroundings.** ``db_overhead.py``'s SQLite scenarios (4 statements
   per checkout, outside and inside a request) on an in-memory engine, and on the same engine
   whose cursor first sends one byte to an echo process through a pipe and waits for it to come
   back — a round trip to another process before every statement, as a statement to a database
   server makes one. asyncsentinel does exactly the same work in both; only the process now gives
   the CPU away between statements, and the other process and the kernel run on the same cores.
2. **Where the time goes on PostgreSQL** (AsyncEngine on asyncpg, 4 statements per request,
   inside a request), and requests that only check a connection out and in, no statement.

Both parts measure asyncsentinel as installed and with parts switched off: with the statement
accounting off (the dialect wrappers still time every statement), and without the statement
wrappers (pool accounting and the request's begin and end only); on SQLite inside a request also
with a minimal request begin and end (a bare request state in the context variable: what the
full begin and end cost the statements that run after them). Every batch of asyncsentinel
as installed is checked as in ``db_overhead.py``: every statement, request and checkout counted,
no internal error.

The switched-off variants replace private functions of asyncsentinel for the length of their
batch (``SQLAlchemySource.executed``, ``sqlalchemy_dialects.join``): they exist only for this
breakdown. Results: ``benchmarks/results/db_round_trips.json`` (``--quick``: ``.quick.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

import db_overhead
from asyncsentinel.context import RequestState, enter_request, exit_request
from asyncsentinel.sources import sqlalchemy as sqlalchemy_source
from asyncsentinel.sources import sqlalchemy_dialects
from common import (
    RESULTS_DIR,
    machine_info,
    markdown_table,
    package_versions,
    rotated,
    run_info,
    summarize,
    write_json,
)
from db_overhead import (
    ROUTE,
    ROWS,
    SCENARIOS,
    AsyncSentinelVariant,
    Expected,
    Scenario,
    Timing,
    Variant,
    run_async,
    run_sync,
)

DESCRIPTION = (
    "asyncsentinel's µs per statement on SQLite with and without a round trip to another "
    "process per statement, and a breakdown of its cost on PostgreSQL."
)
_ECHO = "import os\nwhile (b := os.read(0, 1)):\n    os.write(1, b)\n"
_CHECKOUTS_ONLY = Scenario("checkouts only", True, 0, "a request that checks a connection out")


# --- 1. the same SQLite work, with a round trip per statement -----------------------------------
class EchoProcess:
    """A child process that sends back every byte it gets: a round trip to another process."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._out, self._in = self._process.stdin.fileno(), self._process.stdout.fileno()

    def round_trip(self) -> None:
        os.write(self._out, b"x")
        os.read(self._in, 1)

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=10)


def round_trip_engine(echo: EchoProcess) -> Engine:
    """:func:`db_overhead.sqlite_engine` whose cursor makes a round trip before each statement."""
    round_trip = echo.round_trip

    class RoundTripCursor(sqlite3.Cursor):
        def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
            round_trip()
            return super().execute(sql, parameters)

    class RoundTripConnection(sqlite3.Connection):
        def cursor(self, factory: Any = RoundTripCursor) -> Any:
            return super().cursor(factory)

    engine = create_engine("sqlite://", connect_args={"factory": RoundTripConnection})
    with engine.begin() as conn:
        db_overhead._metadata.create_all(conn)
        conn.execute(db_overhead._items.insert(), db_overhead._ROW_VALUES)
    return engine


# --- asyncsentinel with parts switched off ------------------------------------------------------
def _not_accounted(self: Any, context: Any, statement: str, elapsed: int) -> None:
    """``SQLAlchemySource.executed`` switched off: the wrappers still time the statement."""


def _not_joined(observer: Any) -> None:
    """``sqlalchemy_dialects.join``/``leave`` switched off: no statement wrappers at all."""


class _PatchedVariant(AsyncSentinelVariant):
    """asyncsentinel with some of its functions replaced for the length of a batch."""

    patches: tuple[tuple[Any, str, Callable[..., None]], ...] = ()

    def install(self, engine: Engine) -> None:
        self._saved = [(owner, name, getattr(owner, name)) for owner, name, _ in self.patches]
        for owner, name, replacement in self.patches:
            setattr(owner, name, replacement)
        super().install(engine)

    def uninstall(self) -> None:
        super().uninstall()
        for owner, name, original in self._saved:
            setattr(owner, name, original)


class StatementsNotAccounted(_PatchedVariant):
    name = "statements timed, not accounted"
    patches = ((sqlalchemy_source.SQLAlchemySource, "executed", _not_accounted),)


class StatementsNotHooked(_PatchedVariant):
    name = "no statement wrappers (pool accounting only)"
    patches = (
        (sqlalchemy_dialects, "join", _not_joined),
        (sqlalchemy_dialects, "leave", _not_joined),
    )


class MinimalRequestBracket(AsyncSentinelVariant):
    """asyncsentinel whose requests are entered without ``begin_request``/``end_request``: a
    bare request state in the context variable, so the statements are still accounted to a
    request but nothing else of the request's begin and end runs between them."""

    name = "minimal request begin/end"

    def enter(self) -> Any:
        state = RequestState("GET", self._scope, lambda scope: ROUTE)
        return enter_request(state)

    def exit(self, token: Any) -> None:
        exit_request(token)


# --- measuring ----------------------------------------------------------------------------------
Run = Callable[[Variant, Scenario, int], Timing]


def paired(
    variants: list[Variant],
    scenario: Scenario,
    run: Run,
    engine: Engine,
    rounds: int,
    units: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """Added wall and CPU µs per statement (per request for a scenario without statements) of
    every variant but the first (``none``), paired per round."""
    per = max(scenario.statements, 1) * units
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    by_name = {v.name: v for v in variants}
    for round_index in range(rounds):
        for name in rotated(list(by_name), round_index):
            variant = by_name[name]
            variant.install(engine)
            try:
                run(variant, scenario, 5)  # warm-up, untimed
                gc.collect()
                timing = run(variant, scenario, units)
                if type(variant) is AsyncSentinelVariant:  # whole: it must have seen it all
                    expected = Expected()
                    expected.add(scenario, 5 + units)
                    variant.verify(expected)  # raises BenchmarkError otherwise
            finally:
                variant.uninstall()
            wall[name].append(timing.wall_ns / per / 1000)
            cpu[name].append(timing.cpu_ns / per / 1000)
    base = variants[0].name
    result = {base: {"wall_us": summarize(wall[base]), "cpu_us": summarize(cpu[base])}}
    for name in list(by_name)[1:]:
        result[name] = {
            "added_wall_us": summarize(
                [a - b for a, b in zip(wall[name], wall[base], strict=True)]
            ),
            "added_cpu_us": summarize([a - b for a, b in zip(cpu[name], cpu[base], strict=True)]),
        }
    return result


def breakdown_variants() -> list[Variant]:
    """``none`` first (the baseline), then asyncsentinel whole and with parts switched off."""
    return [Variant(), AsyncSentinelVariant(), StatementsNotAccounted(), StatementsNotHooked()]


def measure_sqlite(rounds: int, units: int) -> dict[str, Any]:
    echo = EchoProcess()
    engines = {"in memory": db_overhead.sqlite_engine(), "round trip": round_trip_engine(echo)}
    results: dict[str, Any] = {}
    try:
        for scenario in SCENARIOS[:2]:
            for surroundings, engine in engines.items():
                db_overhead._progress(f"sqlite {surroundings}: {scenario.name}…")

                def run(variant: Variant, s: Scenario, n: int, engine: Engine = engine) -> Timing:
                    return run_sync(engine, variant, s, n)

                variants = breakdown_variants()
                if scenario.in_request:  # what the request's begin and end cost the statements
                    variants.append(MinimalRequestBracket())
                results[f"{scenario.name}, {surroundings}"] = paired(
                    variants, scenario, run, engine, rounds, units
                )
    finally:
        for engine in engines.values():
            engine.dispose()
        echo.close()
    return results


def measure_postgres(url: str, rounds: int, units: int) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    engine: AsyncEngine = loop.run_until_complete(db_overhead._postgres_engine(url))

    def run(variant: Variant, scenario: Scenario, n: int) -> Timing:
        return loop.run_until_complete(run_async(engine, variant, scenario, n))

    sync_engine = engine.sync_engine
    try:
        db_overhead._progress("postgresql: 4 statements per request…")
        results = {
            SCENARIOS[1].name: paired(
                breakdown_variants(), SCENARIOS[1], run, sync_engine, rounds, units
            )
        }
        db_overhead._progress("postgresql: checkouts only…")
        results[_CHECKOUTS_ONLY.name] = paired(
            [Variant(), AsyncSentinelVariant()], _CHECKOUTS_ONLY, run, sync_engine, rounds, units
        )
    finally:
        loop.run_until_complete(db_overhead._drop_postgres(engine))
        loop.close()
    return results


def _table(results: dict[str, Any]) -> str:
    rows = []
    for scenario, by_variant in results.items():
        unit = "µs per request" if scenario == _CHECKOUTS_ONLY.name else "µs per statement"
        base = by_variant["none"]["wall_us"]["median"]
        for name, figures in by_variant.items():
            if name != "none":
                rows.append(
                    [
                        f"{scenario} (none: {base:.1f} {unit})",
                        name,
                        db_overhead._fmt(figures["added_wall_us"]),
                        db_overhead._fmt(figures["added_cpu_us"]),
                    ]
                )
    return markdown_table(["scenario", "variant", "added wall [IQR]", "added CPU [IQR]"], rows)


def tables(sqlite: dict[str, Any], postgres: dict[str, Any] | None) -> str:
    out = [
        "### 1. The same SQLite work, with and without a round trip to another process before "
        "each statement\n",
        _table(sqlite),
    ]
    if postgres is not None:
        out += [
            "\n### 2. PostgreSQL (AsyncEngine, asyncpg), inside a request\n",
            _table(postgres),
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    parser.add_argument("--rounds", type=int, help="rounds (default 30; --quick 5)")
    parser.add_argument("--units", type=int, help="requests per batch (default 200; --quick 40)")
    parser.add_argument("--postgres", help="PostgreSQL URL (default: as db_overhead.py)")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 30)
    units = args.units or (40 if args.quick else 200)
    logging.getLogger("asyncsentinel").addHandler(logging.NullHandler())
    logging.getLogger("asyncsentinel").propagate = False
    started = time.perf_counter()
    sqlite = measure_sqlite(rounds, units)
    postgres = None
    if not args.no_postgres:
        engines = argparse.Namespace(engines=["postgresql"], postgres=args.postgres)
        url, _origin = db_overhead.postgres_url_for(engines)
        assert url is not None
        postgres = measure_postgres(url, rounds, units)
    print(tables(sqlite, postgres))
    payload = {
        "benchmark": "db_round_trips",
        "description": DESCRIPTION,
        "machine": machine_info(),
        "run": run_info(),
        "versions": package_versions(db_overhead.VERSIONED),
        "method": {
            "rounds": rounds,
            "requests_per_batch": units,
            "statements_per_request": SCENARIOS[0].statements,
            "rows": ROWS,
            "figure": "median over rounds of (variant - none) in the same round; q1/q3 across "
            "rounds; wall = perf_counter, cpu = process CPU time; the request's begin and end "
            "are not in the window",
        },
        "sqlite": sqlite,
        "postgresql": postgres,
        "duration_seconds": round(time.perf_counter() - started, 1),
    }
    name = "db_round_trips.quick.json" if args.quick else "db_round_trips.json"
    path = write_json(Path(args.results_dir) / name, payload)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
