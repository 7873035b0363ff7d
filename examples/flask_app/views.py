"""HTTP views. Every `Provide[...]` in one request gets the request's Session."""

from __future__ import annotations

from typing import Any

from dependency_injector.wiring import Provide, inject
from flask import Blueprint, Response, abort, request
from sqlalchemy.orm import Session

from .containers import Container
from .services import OutOfStockError, ProductNotFoundError, ShopService, SkuTakenError

blueprint = Blueprint("shop", __name__)


@blueprint.post("/products")
@inject
def add_product(service: ShopService = Provide[Container.service]) -> tuple[dict[str, Any], int]:
    body = request.get_json()
    try:
        product = service.add_product(body["sku"], body["name"], int(body["stock"]))
    except SkuTakenError:
        abort(409, f"{body['sku']} already exists")
    return {"id": product.id, "sku": product.sku, "stock": product.stock}, 201


@blueprint.get("/products/<sku>")
@inject
def read_product(sku: str, service: ShopService = Provide[Container.service]) -> dict[str, Any]:
    try:
        product = service.product(sku)
    except ProductNotFoundError:
        abort(404, f"no product {sku}")
    return {"sku": product.sku, "name": product.name, "stock": product.stock}


# --8<-- [start:views]
@blueprint.post("/orders")
@inject
def place_order(service: ShopService = Provide[Container.service]) -> tuple[dict[str, Any], int]:
    try:
        order = service.place_order(request.get_json()["lines"])
    except ProductNotFoundError as exc:
        abort(404, f"no product {exc}")
    except OutOfStockError as exc:
        abort(409, str(exc))  # a 4xx: the stock taken by earlier lines is rolled back
    return {"order": order.id, "lines": len(order.lines)}, 201


@blueprint.get("/products.csv")
@inject
def export_stock(service: ShopService = Provide[Container.service]) -> Response:
    # The body is produced while the server sends it: the session stays open until the last row.
    return Response(service.stock_report(), mimetype="text/csv")


# --8<-- [end:views]


@blueprint.get("/debug/sessions")
@inject
def sessions(
    service: ShopService = Provide[Container.service],
    session: Session = Provide[Container.session],
) -> dict[str, int]:
    """Which session each injection got (SQLAlchemy's unique hash_key): all equal, new on each request."""
    return {
        "view": session.hash_key,
        "products": service.products.session.hash_key,
        "orders": service.orders.session.hash_key,
        "exports": service.exports.session.hash_key,
    }
