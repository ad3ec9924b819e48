"""``asyncsentinel demo`` end to end: a real process, uvicorn over loopback, SQLite or PostgreSQL.

The demo must report, for every detector that is registered, the findings its misbehaving
routes trigger (each on the route built for it, with a culprit line in the shop's code), and
nothing at all on the healthy routes.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from asyncsentinel import findings as kinds
from asyncsentinel.demo import load_shop
from asyncsentinel.demo.report import OUTSIDE_REQUEST
from asyncsentinel.demo.traffic import plan
from asyncsentinel.sentinel import BUILTIN_SOURCES

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
REQUESTS = 2

# What the demo's misbehaving routes make each built-in source report (on SQLite and PostgreSQL).
DEMO_KINDS_BY_SOURCE: dict[str, set[str]] = {
    "asyncsentinel.sources.sqlalchemy": {
        kinds.N_PLUS_ONE,
        kinds.SLOW_QUERY,
        kinds.POOL_EXHAUSTED,
        kinds.SYNC_DB_ON_EVENT_LOOP,
        kinds.ENGINE_CREATED_IN_REQUEST,
        kinds.CONNECTION_LEAKED,
        kinds.POOL_NOT_DISPOSED,
    },
    "asyncsentinel.sources.sqlalchemy_sessions": {
        kinds.SESSION_SHARED_ACROSS_TASKS,
        kinds.LAZY_LOAD_IN_ASYNC,
    },
    "asyncsentinel.sources.asyncpg": set(),  # the shop has no direct asyncpg pool
    "asyncsentinel.sources.loop": {kinds.EVENT_LOOP_BLOCKED},
    "asyncsentinel.sources.tasks": {
        kinds.TASK_LEAKED,
        kinds.CANCELLATION_SWALLOWED,
        kinds.TASK_EXCEPTION_UNRETRIEVED,
    },
    "asyncsentinel.sources.aiohttp": {
        kinds.CLIENT_SESSION_PER_REQUEST,
        kinds.CLIENT_SESSION_UNCLOSED,
    },
    "asyncsentinel.sources.threadpool": set(),  # gauges only
}


def _kinds_named_in(module: str) -> set[str]:
    """The finding kinds a source module imports (for a source this test does not list yet)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    tree = ast.parse(Path(spec.origin).read_text())
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "asyncsentinel.findings"
        for alias in node.names
    }
    return {getattr(kinds, n) for n in names if getattr(kinds, n, None) in kinds.ALL_KINDS}


def expected_kinds() -> set[str]:
    """Kinds the registered detectors must find in the demo (start-up advice excluded)."""
    expected: set[str] = set()
    for _setting, module, _class in BUILTIN_SOURCES:
        if module in DEMO_KINDS_BY_SOURCE:
            expected |= DEMO_KINDS_BY_SOURCE[module]
        else:
            expected |= _kinds_named_in(module)
    return expected - {kinds.DB_CONFIGURATION_ADVICE}


def routes_by_kind() -> dict[str, set[str]]:
    """``kind -> {"GET /bad/..."}`` from the shop's misbehaving routes, whose docstrings start
    with the kind they trigger."""
    shop_app = load_shop()
    bad = importlib.import_module(f"{shop_app.__package__}.bad")
    out: dict[str, set[str]] = {}
    for route in bad.router.routes:
        kind = (route.endpoint.__doc__ or "").split(":", 1)[0].strip()
        assert kind in kinds.ALL_KINDS, f"{route.path}: docstring must start with its kind"
        for method in route.methods:
            out.setdefault(kind, set()).add(f"{method} {route.path}")
    return out


@dataclass(frozen=True)
class Row:
    """One row of the demo's findings table."""

    kind: str
    route: str
    count: int
    culprit: str


def _table(lines: list[str], header: str) -> list[list[str]]:
    """The rows (cells split on runs of 2+ spaces) of the table whose header starts *header*."""
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


@dataclass(frozen=True)
class DemoRun:
    """A finished ``asyncsentinel demo`` process and its parsed report."""

    result: subprocess.CompletedProcess[str]
    traffic: dict[str, tuple[str, int, str]]
    """``"GET /route" -> (role, requests, answers)``."""
    rows: list[Row]
    log: str
    """The log file the report names (the demo keeps it; the test reads and removes it)."""


def run_demo(*args: str) -> DemoRun:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ASYNCSENTINEL_") and k != "DATABASE_URL"
    }
    result = subprocess.run(
        [sys.executable, "-m", "asyncsentinel", "demo", "--requests", str(REQUESTS), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,  # culprits are printed relative to the working directory
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    traffic = {
        label: (role, int(count), answers)
        for label, role, count, answers in _table(lines, "ROUTE  ")
    }
    rows = [
        Row(kind, route, int(count), culprit)
        for kind, route, count, culprit in _table(lines, "KIND  ")
    ]
    match = re.search(r"Every finding's log record, with its stack: (\S+)", result.stdout)
    assert match, result.stdout
    log_path = Path(match.group(1))
    log = log_path.read_text()
    shutil.rmtree(log_path.parent)
    return DemoRun(result, traffic, rows, log)


def check_report(run: DemoRun) -> None:
    steps = plan(REQUESTS)
    healthy = {s.label for s in steps if s.healthy}

    # Every route was exercised as planned; the healthy ones answered 2xx every time.
    assert set(run.traffic) == {s.label for s in steps}
    for step in steps:
        role, count, answers = run.traffic[step.label]
        assert count == step.count
        assert role == ("healthy" if step.healthy else "misbehaving")
        if step.healthy:
            assert re.fullmatch(r"2\d\d x\d+", answers), (step.label, answers)

    # The healthy controls produced no finding at all.
    assert not [r for r in run.rows if r.route in healthy], run.result.stdout

    # Every kind a registered detector covers was found on the route built for it, with the
    # culprit in the shop's own code (not SQLAlchemy's, asyncio's or uvicorn's).
    designated = routes_by_kind()
    for kind in sorted(expected_kinds()):
        where = designated[kind] | {OUTSIDE_REQUEST}
        hits = [r for r in run.rows if r.kind == kind and r.route in where]
        assert hits, f"{kind} not reported on {sorted(designated[kind])}:\n{run.result.stdout}"
        assert any(r.culprit.startswith("examples/shop/") for r in hits), hits
        assert all(r.count >= 1 for r in hits)

    # The finding records (with culprit and stack) are in the log file the report names.
    if kinds.N_PLUS_ONE in expected_kinds():
        assert re.search(
            r"asyncsentinel n_plus_one on GET /bad/orders-per-row at \S*examples/shop/bad\.py:\d+",
            run.log,
        )
    assert "/metrics" in run.result.stdout
    # What the misbehaving routes cause (tracebacks, never-awaited coroutines) is in the log,
    # not on the terminal next to the report.
    assert "Warning" not in run.result.stdout + run.result.stderr, run.result.stderr


def test_demo_on_sqlite_reports_every_detector_and_nothing_on_healthy_routes() -> None:
    run = run_demo()
    assert "on sqlite+aiosqlite:///" in run.result.stderr
    check_report(run)


def test_demo_on_postgresql(postgres_url: str) -> None:
    run = run_demo("--database-url", postgres_url)
    assert "on postgresql+asyncpg://" in run.result.stderr
    check_report(run)
