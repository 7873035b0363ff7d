"""Business rules. The service never commits: the request's unit of work does, by its outcome."""

from __future__ import annotations

from collections.abc import Iterator

from .models import Order, Product
from .repositories import ExportRepository, OrderRepository, ProductRepository


class SkuTakenError(Exception):
    pass


class ProductNotFoundError(Exception):
    pass


class OutOfStockError(Exception):
    pass


class ShopService:
    def __init__(
        self, products: ProductRepository, orders: OrderRepository, exports: ExportRepository
    ) -> None:
        self.products = products
        self.orders = orders
        self.exports = exports

    def add_product(self, sku: str, name: str, stock: int) -> Product:
        if self.products.by_sku(sku) is not None:
            raise SkuTakenError(sku)
        return self.products.add(sku, name, stock)

    def product(self, sku: str) -> Product:
        product = self.products.by_sku(sku)
        if product is None:
            raise ProductNotFoundError(sku)
        return product

    def place_order(self, lines: dict[str, int]) -> Order:
        """All or nothing: a line that cannot be served fails the request, and the stock taken by the
        lines before it is given back by the rollback."""
        order = self.orders.create()
        for sku, quantity in lines.items():
            product = self.product(sku)
            if quantity <= 0 or quantity > product.stock:
                raise OutOfStockError(f"{sku}: {quantity} wanted, {product.stock} in stock")
            product.stock -= quantity
            self.orders.add_line(order, product, quantity)
        return order

    def stock_report(self) -> Iterator[str]:
        """CSV lines, read from the database while they are sent; the export is recorded at the end."""
        yield "sku,name,stock\n"
        rows = 0
        for product in self.products.stream_all():
            rows += 1
            yield f"{product.sku},{product.name},{product.stock}\n"
        self.exports.record(rows)  # after the status: committed when the body is done
