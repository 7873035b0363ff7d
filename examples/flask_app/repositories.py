"""Repositories: each gets the request's session injected; none of them commits."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Export, Order, OrderLine, Product


class ProductRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, sku: str, name: str, stock: int) -> Product:
        product = Product(sku=sku, name=name, stock=stock)
        self.session.add(product)
        self.session.flush()  # assigns the id; the commit belongs to the request
        return product

    def by_sku(self, sku: str) -> Product | None:
        return self.session.scalar(select(Product).where(Product.sku == sku))

    def stream_all(self) -> Iterator[Product]:
        """Every product, fetched in batches while the caller consumes them."""
        return iter(
            self.session.scalars(select(Product).order_by(Product.sku).execution_options(yield_per=100))
        )


class OrderRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self) -> Order:
        order = Order()
        self.session.add(order)
        return order

    def add_line(self, order: Order, product: Product, quantity: int) -> OrderLine:
        line = OrderLine(order=order, product=product, quantity=quantity)
        self.session.add(line)
        return line


class ExportRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def record(self, rows: int) -> None:
        self.session.add(Export(rows=rows))
