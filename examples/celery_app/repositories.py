"""Repositories: each gets the task's session injected; none of them commits."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Item, Reservation


class ItemRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get_for_update(self, sku: str) -> Item | None:
        # FOR UPDATE: two workers reserving the same item queue up on its row (PostgreSQL).
        return self.session.scalar(select(Item).where(Item.sku == sku).with_for_update())


class ReservationRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, order_ref: str, sku: str, quantity: int) -> Reservation:
        reservation = Reservation(order_ref=order_ref, sku=sku, quantity=quantity)
        self.session.add(reservation)
        self.session.flush()  # assigns the id, and fails here for an order reserved twice
        return reservation
