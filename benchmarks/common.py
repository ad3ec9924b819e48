"""Shared helpers for the benchmark suites: statistics, machine facts, result files, tables.

Every suite measures variants side by side in one process run, interleaved per round, and
reports each variant against a baseline as the median of *paired* per-round differences. On a
shared machine the load changes from second to second; pairing each round's measurement with
the baseline's measurement of the same round cancels most of that drift, and the median with
its interquartile range resists the rounds that a neighbour's burst of work spoiled.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
REPO_DIR = BENCHMARKS_DIR.parent


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile (inclusive method; fine for 5+ values)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, IQR, min and max of per-round values."""
    q1, median, q3 = quartiles(values)
    return {
        "median": median,
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": min(values),
        "max": max(values),
    }


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    """*items* rotated by *round_index*, so each variant takes each position equally often."""
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def require_installed(names: Iterable[str]) -> None:
    """Exit with a clear message when a distribution a suite drives is not installed.

    The peers and servers the suites compare against are the ``bench`` extra, not the ``dev``
    one ``make test`` installs; without this a suite would fail deep inside a child process.
    """
    missing = [name for name, version in package_versions(names).items() if version is None]
    if missing:
        sys.exit(
            f"benchmarks need the 'bench' extra; missing: {', '.join(missing)}. Install it with "
            f"`.venv/bin/pip install -e '.[bench]'` (`make bench` does, then runs every suite)."
        )


def source_digests(names: Iterable[str]) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of the asyncsentinel files a suite measures, by path inside
    the package: the source tree changes while benchmarks run, and the figures belong to one
    version of these files. asyncsentinel is imported here, not at the top: the peers' server
    processes never load it."""
    import hashlib

    import asyncsentinel

    package = Path(asyncsentinel.__file__).resolve().parent
    return {name: hashlib.sha256((package / name).read_bytes()).hexdigest()[:16] for name in names}


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_info() -> dict[str, Any]:
    """Facts about the machine and interpreter that the figures depend on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
        "shared_machine_note": (
            "figures come from a shared machine where other jobs ran at the same time; "
            "compare variants within one run, not figures across runs"
        ),
    }


def run_info() -> dict[str, Any]:
    """When, how and from which source tree the run was made."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_tracked_files_modified": bool(status) if status is not None else None,
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write *payload* as stable, diff-friendly JSON (sorted keys, trailing newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table, columns padded for reading in a terminal."""
    materialized = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in materialized) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(materialized[0]), rule, *(line(r) for r in materialized[1:])])
