"""The shop's tables: customers place orders for products.

Relationships use ``lazy="raise"`` as the reference patterns require, so an accidental implicit
load fails loudly instead of issuing one query per row; routes load what they need explicitly
(``selectinload``). ``AsyncAttrs`` provides ``obj.awaitable_attrs`` for the routes that misuse it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(AsyncAttrs, DeclarativeBase):
    """Declarative base of the shop's models."""


class Customer(Base):
    """Someone who buys things."""

    __tablename__ = "shop_customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200), unique=True)
    orders: Mapped[list[Order]] = relationship(back_populates="customer", lazy="raise")


class Product(Base):
    """Something for sale."""

    __tablename__ = "shop_products"

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    price_cents: Mapped[int]
    orders: Mapped[list[Order]] = relationship(back_populates="product", lazy="raise")


class Order(Base):
    """One customer buying a quantity of one product."""

    __tablename__ = "shop_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("shop_customers.id"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("shop_products.id"), index=True)
    quantity: Mapped[int]
    # Set in Python, so a new order needs no reload (an implicit load would fail in async code).
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=lambda: datetime.now(UTC)
    )
    customer: Mapped[Customer] = relationship(back_populates="orders", lazy="raise")
    product: Mapped[Product] = relationship(back_populates="orders", lazy="raise")


CUSTOMER_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken")
PRODUCTS = (
    ("KB-01", "Mechanical keyboard", 8900),
    ("MS-02", "Wireless mouse", 2900),
    ("MN-03", "27-inch monitor", 27900),
    ("HS-04", "Headset", 5900),
    ("DK-05", "Standing desk", 39900),
    ("CB-06", "USB-C cable", 900),
)


def seed_customers() -> list[Customer]:
    """The demo's customers (ids are assigned by the database: 1 to 8 on a fresh one)."""
    return [Customer(name=name, email=f"{name.lower()}@example.com") for name in CUSTOMER_NAMES]


def seed_products() -> list[Product]:
    """The demo's products (ids 1 to 6 on a fresh database)."""
    return [Product(sku=sku, name=name, price_cents=price) for sku, name, price in PRODUCTS]


def seed_orders(customers: list[Customer], products: list[Product]) -> list[Order]:
    """40 orders spread over every customer and product (call after the ids were flushed)."""
    return [
        Order(
            customer_id=customers[i % len(customers)].id,
            product_id=products[i * 5 % len(products)].id,
            quantity=i % 3 + 1,
        )
        for i in range(40)
    ]
