"""The shop application: ``create_app()`` and the lifespan that owns every shared resource.

Run it with ``uvicorn shop.app:app`` from ``examples/`` (SQLite in a temporary directory), or
with ``DATABASE_URL=postgresql://user:password@host/db`` for PostgreSQL through asyncpg.
``asyncsentinel demo`` runs it and drives traffic at every route.

The lifespan follows the reference patterns: it creates the engine (``pool_pre_ping=True``), the
``async_sessionmaker(expire_on_commit=False)`` and one aiohttp ``ClientSession`` for the whole
application, and disposes/closes them at shutdown. The exceptions are deliberate and exist for
the misbehaving routes in :mod:`bad`: a synchronous "legacy" engine, and an "analytics" engine
that is never disposed. (Because aiosqlite runs each connection on a non-daemon thread, a
process whose ``/bad/leak-connection`` or ``/bad/undisposed-engine`` ran on SQLite waits for
them at exit: the demo releases them with :func:`release_deliberate_leaks`; under plain
uvicorn press Ctrl-C twice.)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from fastapi import FastAPI
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

import asyncsentinel

from . import bad, routes
from .db import async_url, create_schema, sync_url
from .models import PRODUCTS, Base
from .warehouse import Warehouse


@dataclass(frozen=True)
class ShopSettings:
    """What ``create_app`` was asked for; resources are built from it in the lifespan."""

    database_url: str | None
    pool_size: int
    max_overflow: int
    pool_timeout: float


def _name_pool(app: FastAPI, engine: Any, name: str) -> None:
    # Every engine is observed anyway; naming it only picks its pool label in the metrics.
    sentinel: asyncsentinel.Sentinel = app.state.asyncsentinel
    if sentinel.source("sqlalchemy") is not None:
        sentinel.instrument_engine(engine, name=name)


def _trace_configs(app: FastAPI) -> list[aiohttp.TraceConfig]:
    sentinel: asyncsentinel.Sentinel = app.state.asyncsentinel
    return [sentinel.aiohttp_trace_config()] if sentinel.source("aiohttp") is not None else []


def _write_catalog_export(path: Path) -> Path:
    """A JSON-lines export of the catalogue (about 1 MiB) for ``/bad/blocking-read``."""
    lines = [
        json.dumps({"sku": sku, "name": name, "price_cents": price})
        for sku, name, price in PRODUCTS
    ]
    block = "\n".join(lines) + "\n"
    path.write_text(block * (2**20 // len(block) + 1))
    return path


def _legacy_engine(url: Any, data_dir: Path) -> tuple[Engine, bool]:
    """The synchronous engine of the "legacy reports" module; ``True`` if it needs a schema."""
    sync = sync_url(url)
    if sync is not None:
        return create_engine(sync, pool_pre_ping=True), False
    # PostgreSQL without a synchronous driver installed: a local SQLite copy still shows the bug.
    return create_engine(f"sqlite:///{data_dir / 'legacy.db'}", pool_pre_ping=True), True


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Create the shared resources at start-up; release them, newest first, at shutdown."""
    settings: ShopSettings = app.state.shop_settings
    async with AsyncExitStack() as release:
        data_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="asyncsentinel-shop-"))
        release.push_async_callback(asyncio.to_thread, shutil.rmtree, data_dir, ignore_errors=True)
        url = async_url(settings.database_url or f"sqlite:///{data_dir / 'shop.db'}")

        engine = create_async_engine(
            url,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
            pool_pre_ping=True,
        )
        release.push_async_callback(engine.dispose)
        _name_pool(app, engine, "shop")
        session_factory = async_sessionmaker(engine, expire_on_commit=False)
        await create_schema(engine, session_factory)

        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=50, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=10),
            trace_configs=_trace_configs(app),
        )
        release.push_async_callback(http.close)
        warehouse = Warehouse()
        app.state.warehouse_url = warehouse.start()
        release.push_async_callback(warehouse.stop)

        legacy_engine, legacy_needs_schema = _legacy_engine(url, data_dir)
        release.push_async_callback(asyncio.to_thread, legacy_engine.dispose)
        if legacy_needs_schema:
            await asyncio.to_thread(Base.metadata.create_all, legacy_engine)
        # Deliberate mistake for /bad/undisposed-engine (pool_not_disposed): never disposed.
        analytics_engine: AsyncEngine = create_async_engine(
            url, pool_size=1, max_overflow=0, pool_pre_ping=True
        )
        _name_pool(app, analytics_engine, "analytics")

        app.state.database_url = url
        app.state.engine = engine
        app.state.session_factory = session_factory
        app.state.http = http
        app.state.legacy_engine = legacy_engine
        app.state.analytics_engine = analytics_engine
        app.state.catalog_export = await asyncio.to_thread(
            _write_catalog_export, data_dir / "catalog.jsonl"
        )
        app.state.report_connections = []  # filled by /bad/leak-connection
        app.state.partner_sessions = []  # filled by /bad/unclosed-client-session
        yield


async def release_deliberate_leaks(app: FastAPI) -> None:
    """Close what the misbehaving routes leaked on purpose. For the demo's tidy exit only.

    Call it after asyncsentinel's shutdown checks ran (they are what reports the leaks).
    """
    for conn in app.state.report_connections:
        await conn.invalidate()  # the pool it came from is gone: really close it
        await conn.close()
    app.state.report_connections.clear()
    await app.state.analytics_engine.dispose()
    for http in app.state.partner_sessions:
        await http.close()
    app.state.partner_sessions.clear()


def create_app(
    database_url: str | None = None,
    *,
    pool_size: int = 2,
    max_overflow: int = 0,
    pool_timeout: float = 1.0,
    **sentinel_options: Any,
) -> FastAPI:
    """Build the shop, instrumented by asyncsentinel.

    *database_url*: ``postgresql://...`` (asyncpg) or ``sqlite:///...`` (aiosqlite); default
    ``DATABASE_URL`` from the environment, else a SQLite file in a temporary directory. The pool
    is deliberately small (2 connections, no overflow, 1 s timeout) so that ``/bad/hold-connection``
    can exhaust it. *sentinel_options* go to :func:`asyncsentinel.instrument`.
    """
    database_url = database_url or os.environ.get("DATABASE_URL") or None
    if database_url is not None:
        async_url(database_url)  # fail now, not at start-up, on a URL the shop cannot use
    app = FastAPI(title="asyncsentinel demo shop", lifespan=lifespan)
    app.state.shop_settings = ShopSettings(database_url, pool_size, max_overflow, pool_timeout)
    app.include_router(routes.router)
    app.include_router(bad.router)

    asyncsentinel.instrument(app, **sentinel_options)
    return app


def __getattr__(name: str) -> Any:
    # ``uvicorn shop.app:app`` reads ``app``; build it on first access rather than at import, so
    # importing this module (as the demo does) installs no asyncsentinel instance of its own.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
