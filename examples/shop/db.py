"""Database plumbing, as the reference patterns prescribe: one engine, one sessionmaker,
one ``AsyncSession`` per request through the ``get_db`` dependency.

The shop runs on SQLite through aiosqlite by default and on PostgreSQL through asyncpg when
given a ``postgresql://`` URL (or ``DATABASE_URL`` is set).
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import func, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .models import Base, Customer, seed_customers, seed_orders, seed_products

_ASYNC_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def async_url(database_url: str) -> URL:
    """The URL with an async driver: ``postgresql://`` gets asyncpg, ``sqlite://`` aiosqlite."""
    url = make_url(database_url)
    if url.drivername in _ASYNC_DRIVERS:
        url = url.set(drivername=_ASYNC_DRIVERS[url.drivername])
    if url.drivername not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
        raise ValueError(
            f"the shop runs on PostgreSQL (postgresql://...) or SQLite (sqlite:///...), "
            f"not {url.drivername!r}"
        )
    return url


def sync_url(url: URL) -> URL | None:
    """The same database through a synchronous driver, or ``None`` if none is installed."""
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite")
    for module, driver in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return url.set(drivername=driver)
    return None


async def get_db(request: Request) -> AsyncGenerator[AsyncSession, None]:
    """One session per request: committed when the route succeeds, rolled back when it fails."""
    session_factory: async_sessionmaker[AsyncSession] = request.app.state.session_factory
    async with session_factory() as session:
        try:
            yield session
            await session.commit()
        except Exception:
            await session.rollback()
            raise


DbSession = Annotated[AsyncSession, Depends(get_db)]
"""A route parameter of this type gets the request's session from :func:`get_db`."""


async def create_schema(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    """Create the tables if missing and seed them if empty (safe to run on every start-up)."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with session_factory() as session, session.begin():
        if await session.scalar(select(func.count(Customer.id))):
            return
        customers, products = seed_customers(), seed_products()
        session.add_all([*customers, *products])
        await session.flush()
        session.add_all(seed_orders(customers, products))
