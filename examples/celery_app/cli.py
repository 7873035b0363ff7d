"""Enqueue reservations and look at the stock: ``python -m examples.celery_app.cli --help``."""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from .models import Base, Item, Reservation
from .worker import container, reserve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.celery_app.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help="create the tables and stock two items")
    reserving = commands.add_parser("reserve", help="enqueue a reservation and wait for a worker to run it")
    reserving.add_argument("order_ref")
    reserving.add_argument("sku")
    reserving.add_argument("quantity", type=int)
    commands.add_parser("stock", help="print the stock and the reservations")
    args = parser.parse_args(argv)

    engine = create_engine(container.config.database_url())
    try:
        if args.command == "setup":
            Base.metadata.create_all(engine)
            with Session(engine) as session, session.begin():
                session.add_all([Item(sku="apple", stock=10), Item(sku="pear", stock=2)])
            return 0
        if args.command == "reserve":
            result = reserve.delay(args.order_ref, args.sku, args.quantity)
            outcome = result.get(timeout=60, propagate=False)
            print(f"{args.order_ref}: {result.state} {outcome!r}")
            return 0 if result.successful() else 1
        with Session(engine) as session:
            for item in session.scalars(select(Item).order_by(Item.sku)):
                print(f"{item.sku}: {item.stock} in stock")
            for booked in session.scalars(select(Reservation).order_by(Reservation.id)):
                print(f"{booked.order_ref}: {booked.quantity} x {booked.sku}")
        return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
