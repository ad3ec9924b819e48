"""Run asyncsentinel's benchmark suites: ``python benchmarks/run.py [--suite NAME] [--quick]``.

``make bench`` installs the ``bench`` extra and runs every suite. Each suite prints Markdown
tables and writes its JSON results under ``benchmarks/results/`` (``*.quick.json`` for
``--quick`` runs where the suite supports it, so a quick check never overwrites the full
figures). Benchmarks are not tests: nothing here runs in CI, and the machine's load shows in the
figures. Each suite is also a script of its own with more options (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this directory is on sys.path already; imported, it may not be.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import request_overhead


def _sessions(args: argparse.Namespace) -> None:
    # Imported here: it needs SQLAlchemy and aiosqlite, which the request suite does not.
    import session_hooks

    rounds = args.rounds or (5 if args.quick else 15)
    asyncio.run(session_hooks.main(rounds, args.postgres))


def _script_argv(args: argparse.Namespace, *, rounds: bool = True) -> list[str]:
    """The options a database suite's own script takes, from this command line's."""
    argv = ["--quick"] if args.quick else []
    if rounds and args.rounds:
        argv += ["--rounds", str(args.rounds)]
    if args.postgres:
        argv += ["--postgres", args.postgres]
    if args.results_dir:
        argv += ["--results-dir", args.results_dir]
    return argv


def _db(args: argparse.Namespace) -> None:
    import db_overhead

    db_overhead.main(_script_argv(args))


def _db_instructions(args: argparse.Namespace) -> None:
    import db_instructions

    db_instructions.main(_script_argv(args, rounds=False))  # it counts; it has no rounds


def _db_round_trips(args: argparse.Namespace) -> None:
    import db_round_trips

    db_round_trips.main(_script_argv(args))


def _loop(args: argparse.Namespace) -> None:
    import loop_detection

    loop_detection.run(args)


def _loop_overhead(args: argparse.Namespace) -> None:
    import loop_overhead

    loop_overhead.run(args)


SUITES: dict[str, tuple[str, Callable[[argparse.Namespace], Any]]] = {
    "request": (request_overhead.DESCRIPTION, request_overhead.run),
    "db": ("Per-statement cost of the SQLAlchemy listeners, next to OpenTelemetry's.", _db),
    "db-instructions": (
        "Instructions added per SQL statement and per request, counted by callgrind.",
        _db_instructions,
    ),
    "db-round-trips": (
        "The same statements' cost with a round trip to another process in between, and a "
        "breakdown on PostgreSQL.",
        _db_round_trips,
    ),
    "sessions": (
        "Cost of the SQLAlchemy session detectors per session and per AsyncSession operation.",
        _sessions,
    ),
    "loop": ("Detection quality of blocked-event-loop monitors (recall, culprit, delay).", _loop),
    "loop-overhead": (
        "What the loop monitor and task tracking cost: idle CPU, CPU under load, µs per task.",
        _loop_overhead,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="suites: " + "; ".join(f"{name}: {desc}" for name, (desc, _) in SUITES.items()),
    )
    parser.add_argument(
        "--suite",
        action="append",
        choices=list(SUITES),
        help="run only this suite (repeatable; default: all, in the order listed)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run")
    parser.add_argument(
        "--results-dir",
        help="directory for the JSON results (default benchmarks/results; not 'sessions')",
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds of each suite that has rounds (default per suite)"
    )
    parser.add_argument(
        "--postgres", help="PostgreSQL URL for the db and sessions suites (default: throwaway)"
    )
    request_overhead.add_arguments(parser.add_argument_group("request suite"), rounds=False)
    try:
        import loop_detection
    except ImportError:  # its optional peers are missing: the suite fails when chosen
        pass
    else:
        loop_detection.add_arguments(parser.add_argument_group("loop suite"))
    import loop_overhead

    loop_overhead.add_arguments(parser.add_argument_group("loop-overhead suite"))
    args = parser.parse_args(argv)
    for name in args.suite or list(SUITES):
        print(f"# suite: {name} — {SUITES[name][0]}", flush=True)
        SUITES[name][1](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
