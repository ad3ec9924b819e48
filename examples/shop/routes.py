"""The shop's healthy routes: the patterns done right. None of them may produce a finding.

They are the controls beside the misbehaving routes in :mod:`bad`: explicit eager loading
(``selectinload``), one session per request (``get_db``) or per task, ``TaskGroup`` with
``asyncio.timeout``, ``asyncio.to_thread`` for synchronous work, ``await asyncio.sleep``, and the
application's single aiohttp ``ClientSession``.
"""

from __future__ import annotations

import asyncio
import csv
import io

import aiohttp
from fastapi import APIRouter, HTTPException, Request, Response, status
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from .db import DbSession
from .models import Customer, Order, Product
from .schemas import CustomerDashboard, CustomerOut, OrderIn, OrderOut, ProductOut, Quote, Stock

router = APIRouter()

QUOTE_TIMEOUT_SECONDS = 0.3
"""How long a quote waits for the supplier's delivery estimate before using the fallback."""
SUPPLIER_DELAY_SECONDS = 1.0
"""How long the supplier's delivery estimate takes: longer than the quote is willing to wait."""
RESTOCK_RECHECK_SECONDS = 0.3


@router.get("/health")
async def health(db: DbSession) -> dict[str, str]:
    """Liveness including the database (the one critical dependency)."""
    await db.execute(select(1))
    return {"status": "ok"}


@router.get("/products", response_model=list[ProductOut])
async def list_products(db: DbSession) -> list[Product]:
    """Every product, one query."""
    return list(await db.scalars(select(Product).order_by(Product.id)))


@router.get("/products/{product_id}", response_model=ProductOut)
async def get_product(product_id: int, db: DbSession) -> Product:
    """One product by id."""
    product = await db.get(Product, product_id)
    if product is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such product")
    return product


@router.get("/customers/{customer_id}/orders", response_model=list[OrderOut])
async def list_orders(customer_id: int, db: DbSession) -> list[Order]:
    """A customer's orders with their products: two queries whatever the number of orders."""
    result = await db.scalars(
        select(Order)
        .where(Order.customer_id == customer_id)
        .options(selectinload(Order.product))
        .order_by(Order.id)
    )
    return list(result)


@router.post("/orders", response_model=OrderOut, status_code=status.HTTP_201_CREATED)
async def create_order(new: OrderIn, db: DbSession) -> OrderOut:
    """Place an order (committed by ``get_db`` when the route returns)."""
    product = await db.get(Product, new.product_id)
    if product is None or await db.get(Customer, new.customer_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such customer or product")
    order = Order(customer_id=new.customer_id, product_id=product.id, quantity=new.quantity)
    db.add(order)
    await db.flush()
    return OrderOut(
        id=order.id,
        customer_id=order.customer_id,
        quantity=order.quantity,
        created_at=order.created_at,
        product=ProductOut.model_validate(product),
    )


async def _customer_stats(
    session_factory: async_sessionmaker[AsyncSession], customer_id: int
) -> tuple[Customer | None, int, int]:
    async with session_factory() as session:  # this task's own session
        customer = await session.get(Customer, customer_id)
        count, spent = (
            await session.execute(
                select(
                    func.count(Order.id),
                    func.coalesce(func.sum(Order.quantity * Product.price_cents), 0),
                )
                .join(Product, Order.product_id == Product.id)
                .where(Order.customer_id == customer_id)
            )
        ).one()
        return customer, int(count), int(spent)


async def _favourite_product(
    session_factory: async_sessionmaker[AsyncSession], customer_id: int
) -> str | None:
    async with session_factory() as session:  # this task's own session
        return await session.scalar(
            select(Product.name)
            .join(Order, Order.product_id == Product.id)
            .where(Order.customer_id == customer_id)
            .group_by(Product.id, Product.name)
            .order_by(func.sum(Order.quantity).desc(), Product.id)
            .limit(1)
        )


@router.get("/customers/{customer_id}/dashboard", response_model=CustomerDashboard)
async def customer_dashboard(customer_id: int, request: Request) -> CustomerDashboard:
    """Two queries run concurrently: TaskGroup + ``asyncio.timeout``, one session per task."""
    session_factory = request.app.state.session_factory
    async with asyncio.timeout(5):
        async with asyncio.TaskGroup() as tg:
            stats = tg.create_task(_customer_stats(session_factory, customer_id))
            favourite = tg.create_task(_favourite_product(session_factory, customer_id))
    customer, order_count, spent = stats.result()
    if customer is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such customer")
    return CustomerDashboard(
        customer=CustomerOut.model_validate(customer),
        order_count=order_count,
        spent_cents=spent,
        favourite_product=favourite.result(),
    )


async def fetch_stock(http: aiohttp.ClientSession, warehouse_url: str, product_id: int) -> int:
    """Units the warehouse has of a product (through the application's shared session)."""
    async with http.get(f"{warehouse_url}/stock/{product_id}") as resp:
        resp.raise_for_status()
        return int((await resp.json())["available"])


async def fetch_delivery_days(
    http: aiohttp.ClientSession, warehouse_url: str, product_id: int
) -> int:
    """The supplier's delivery estimate: slow, so callers bound it with a timeout."""
    url = f"{warehouse_url}/stock/{product_id}?delay={SUPPLIER_DELAY_SECONDS}"
    async with http.get(url) as resp:
        resp.raise_for_status()
        return 2 if (await resp.json())["available"] else 10


@router.get("/products/{product_id}/stock", response_model=Stock)
async def product_stock(product_id: int, request: Request) -> Stock:
    """Ask the warehouse through the one ``ClientSession`` created in the lifespan."""
    available = await fetch_stock(
        request.app.state.http, request.app.state.warehouse_url, product_id
    )
    return Stock(product_id=product_id, available=available)


@router.get("/products/{product_id}/quote", response_model=Quote)
async def product_quote(product_id: int, request: Request) -> Quote:
    """Stock and delivery estimate fetched concurrently under a deadline.

    The supplier is slower than the deadline, so the timeout cancels the TaskGroup; the
    cancelled call lets ``CancelledError`` propagate and the route answers with a fallback.
    """
    http, warehouse_url = request.app.state.http, request.app.state.warehouse_url
    try:
        async with asyncio.timeout(QUOTE_TIMEOUT_SECONDS):
            async with asyncio.TaskGroup() as tg:
                stock = tg.create_task(fetch_stock(http, warehouse_url, product_id))
                days = tg.create_task(fetch_delivery_days(http, warehouse_url, product_id))
        return Quote(
            product_id=product_id,
            available=stock.result(),
            delivery_days=days.result(),
            source="supplier",
        )
    except TimeoutError:
        return Quote(product_id=product_id, available=0, delivery_days=7, source="fallback")


def render_sales_csv(rows: list[tuple[str, str, int, int]]) -> str:
    """Synchronous CSV rendering (runs in a worker thread)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["sku", "product", "units", "revenue_cents"])
    writer.writerows(rows)
    return out.getvalue()


@router.get("/reports/sales.csv")
async def sales_report(db: DbSession) -> Response:
    """Sales per product as CSV: the query is async, the rendering runs in ``to_thread``."""
    result = await db.execute(
        select(
            Product.sku,
            Product.name,
            func.coalesce(func.sum(Order.quantity), 0),
            func.coalesce(func.sum(Order.quantity * Product.price_cents), 0),
        )
        .outerjoin(Order, Order.product_id == Product.id)
        .group_by(Product.id, Product.sku, Product.name)
        .order_by(Product.id)
    )
    rows = [(sku, name, int(units), int(revenue)) for sku, name, units, revenue in result]
    body = await asyncio.to_thread(render_sales_csv, rows)
    return Response(body, media_type="text/csv")


@router.get("/products/{product_id}/restock-eta")
async def restock_eta(product_id: int, request: Request) -> dict[str, float | int]:
    """Measures how fast stock moves: read, ``await asyncio.sleep``, read again.

    It takes as long as ``/bad/blocking-sleep`` but the event loop keeps serving meanwhile.
    """
    http, warehouse_url = request.app.state.http, request.app.state.warehouse_url
    before = await fetch_stock(http, warehouse_url, product_id)
    await asyncio.sleep(RESTOCK_RECHECK_SECONDS)
    after = await fetch_stock(http, warehouse_url, product_id)
    return {
        "product_id": product_id,
        "units_per_second": (after - before) / RESTOCK_RECHECK_SECONDS,
    }
