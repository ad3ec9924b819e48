"""Cost of the SQLAlchemy session detectors: per session created and per AsyncSession operation.

``python benchmarks/session_hooks.py [--rounds 15] [--postgres URL]`` runs, in one process, the
same workloads with the ``sqlalchemy_sessions`` source installed and uninstalled, interleaved
per round (order rotated), and reports the median of the paired per-round differences:

* ``session``: ``async with maker() as session: pass`` — ``Session.__init__`` (creation site:
  one frame walk, line resolved lazily), the sessionmaker hook and the wrapped ``close()``;
* ``get (identity map)``: ``await session.get(Item, 1)`` answered from the identity map, the
  cheapest AsyncSession operation there is (no SQL), so the wrapper's cost shows;
* ``execute``: ``await session.execute(select(Item))`` on in-memory SQLite (aiosqlite), and on
  PostgreSQL through asyncpg when ``--postgres`` is given.

Results go to ``benchmarks/results/session_hooks.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asyncsentinel.config import Settings
from asyncsentinel.findings import Dispatcher
from asyncsentinel.sources.sqlalchemy_sessions import SQLAlchemySessionSource
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


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_session_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


async def timed(repeat: int, step: Callable[[], Awaitable[Any]]) -> float:
    """Microseconds per call of *step*."""
    start = time.perf_counter_ns()
    for _ in range(repeat):
        await step()
    return (time.perf_counter_ns() - start) / repeat / 1000


async def workloads(url: str, label: str) -> dict[str, Callable[[], Awaitable[float]]]:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(Item.__table__.insert(), [{"id": 1, "name": "one"}])
    maker = async_sessionmaker(engine, expire_on_commit=False)
    held: AsyncSession = maker()
    item = await held.get(Item, 1)  # the identity map holds objects weakly: keep this one

    async def one_session() -> None:
        async with maker():
            pass

    async def get_cached() -> None:
        assert await held.get(Item, 1) is item

    async def execute() -> None:
        (await held.execute(select(Item))).scalars().all()

    result: dict[str, Callable[[], Awaitable[float]]] = {
        "session": lambda: timed(1000, one_session),
        "get (identity map)": lambda: timed(2000, get_cached),
        f"execute ({label})": lambda: timed(300, execute),
    }
    return result


async def main(rounds: int, postgres: str | None) -> None:
    source = SQLAlchemySessionSource(Settings.load({}), Dispatcher([]))
    suites = await workloads("sqlite+aiosqlite://", "sqlite")
    if postgres:
        suites["execute (postgresql)"] = (await workloads(postgres, "postgresql"))[
            "execute (postgresql)"
        ]
    differences: dict[str, list[float]] = {name: [] for name in suites}
    baseline: dict[str, list[float]] = {name: [] for name in suites}
    for round_index in range(rounds):
        for name, run in suites.items():
            figures: dict[str, float] = {}
            for variant in rotated(["none", "sessions"], round_index):
                if variant == "sessions":
                    source.install()
                try:
                    await run()  # warm up this variant's path
                    figures[variant] = await run()
                finally:
                    if variant == "sessions":
                        source.uninstall()
                gc.collect()
            differences[name].append(figures["sessions"] - figures["none"])
            baseline[name].append(figures["none"])
    rows = []
    for name in suites:
        added, base = summarize(differences[name]), summarize(baseline[name])
        rows.append(
            [name, f"{base['median']:.2f}", f"{added['median']:+.2f}", f"{added['iqr']:.2f}"]
        )
    print(markdown_table(["workload", "without (us)", "added (us)", "IQR (us)"], rows))
    write_json(
        RESULTS_DIR / "session_hooks.json",
        {
            "machine": machine_info(),
            "run": run_info(),
            "versions": package_versions(["sqlalchemy", "asyncpg", "aiosqlite"]),
            "rounds": rounds,
            "added_microseconds": {n: summarize(differences[n]) for n in suites},
            "baseline_microseconds": {n: summarize(baseline[n]) for n in suites},
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--postgres", help="a postgresql+asyncpg:// URL to time execute on too")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.postgres))
