"""Tables of the inventory."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    sku: Mapped[str] = mapped_column(String(40), primary_key=True)
    stock: Mapped[int]


class Reservation(Base):
    __tablename__ = "reservations"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_ref: Mapped[str] = mapped_column(String(40), unique=True)
    sku: Mapped[str] = mapped_column(ForeignKey("items.sku"))
    quantity: Mapped[int]
