"""Business rules. The service never commits: the task's unit of work does, by the task's outcome."""

from __future__ import annotations

from .repositories import ItemRepository, ReservationRepository


class UnknownItemError(Exception):
    pass


class OutOfStockError(Exception):
    pass


class InventoryService:
    def __init__(self, items: ItemRepository, reservations: ReservationRepository) -> None:
        self.items = items
        self.reservations = reservations

    def reserve(self, order_ref: str, sku: str, quantity: int) -> int:
        """Record the reservation and take the stock: both or neither."""
        item = self.items.get_for_update(sku)
        if item is None:
            raise UnknownItemError(sku)
        reservation = self.reservations.add(order_ref, sku, quantity)
        if item.stock < quantity:
            # The reservation row is already written; the task's rollback removes it.
            raise OutOfStockError(f"{sku}: {item.stock} left, {quantity} wanted for {order_ref}")
        item.stock -= quantity
        return reservation.id

    def restock(self, sku: str, quantity: int) -> int:
        item = self.items.get_for_update(sku)
        if item is None:
            raise UnknownItemError(sku)
        item.stock += quantity
        return item.stock
