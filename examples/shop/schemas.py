"""What the shop's API reads and returns."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class ProductOut(BaseModel):
    """A product as the API shows it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    sku: str
    name: str
    price_cents: int


class CustomerOut(BaseModel):
    """A customer as the API shows it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    email: str


class OrderOut(BaseModel):
    """An order with the product it is for."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    customer_id: int
    quantity: int
    created_at: datetime | None = None
    product: ProductOut


class OrderIn(BaseModel):
    """A new order."""

    customer_id: int
    product_id: int
    quantity: int = Field(ge=1, le=100)


class CustomerDashboard(BaseModel):
    """A customer's overview, assembled from several queries run concurrently."""

    customer: CustomerOut
    order_count: int
    spent_cents: int
    favourite_product: str | None


class Stock(BaseModel):
    """Stock level reported by the warehouse."""

    product_id: int
    available: int


class Quote(BaseModel):
    """A delivery quote; ``source`` says whether the supplier answered in time."""

    product_id: int
    available: int
    delivery_days: int
    source: str
