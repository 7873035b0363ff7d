"""Tests of the Flask shop, as its authors would write them.

Run: `.venv/bin/pytest examples/flask_app -q`

Each test builds the app on its own database, `create_app("sqlite:///<tmp file>")`
(or a private PostgreSQL schema), and drives it with Flask's test client, through
the middleware: `app.wsgi_app` is wrapped, and the test client calls the app the
way a server does. One test serves it on a real server on 127.0.0.1.

Flask's test client leaves a response's body open until the response is closed,
and the request scope ends when the body is closed (as PEP 3333 says). The
`ClosingClient` below buffers each response, which closes its body at once, as a
server does; without it, use `with client.get(...) as response:`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from werkzeug.serving import make_server

from di_request_scope import request_scope
from examples.flask_app.main import create_app
from examples.flask_app.models import Export, OrderLine, Product


# --8<-- [start:client]
class ClosingClient(FlaskClient):
    """Flask's test client, closing each response body (and so the request scope) at once."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


# --8<-- [end:client]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The app's database: a fresh SQLite file, or a fresh schema on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shop.sqlite3"
    return str(request.getfixturevalue("postgres_schema_url"))


@pytest.fixture
def app(database_url: str) -> Iterator[Flask]:
    app = create_app(database_url)
    app.test_client_class = ClosingClient
    yield app
    container = app.extensions["container"]
    assert container.engine().pool.checkedout() == 0  # every request gave its connection back
    container.shutdown_resources()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def stored(database_url: str) -> dict[str, Any]:
    """What is committed, read through a connection of its own."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            return {
                "stock": {p.sku: p.stock for p in session.scalars(select(Product))},
                "order_lines": session.scalar(select(func.count()).select_from(OrderLine)),
                "exports": [e.rows for e in session.scalars(select(Export))],
            }
    finally:
        engine.dispose()


def add_product(client: FlaskClient, sku: str, stock: int) -> None:
    response = client.post("/products", json={"sku": sku, "name": sku.title(), "stock": stock})
    assert response.status_code == 201, response.text


def test_add_products_place_an_order_and_read_the_stock(client: FlaskClient, database_url: str) -> None:
    add_product(client, "apple", 10)
    add_product(client, "pear", 5)

    response = client.post("/orders", json={"lines": {"apple": 3, "pear": 5}})

    assert response.status_code == 201
    assert response.json == {"order": 1, "lines": 2}
    assert client.get("/products/pear").json == {"sku": "pear", "name": "Pear", "stock": 0}
    assert stored(database_url) == {"stock": {"apple": 7, "pear": 0}, "order_lines": 2, "exports": []}


def test_an_order_that_cannot_be_served_gives_back_the_stock_of_every_line(
    client: FlaskClient, database_url: str
) -> None:
    add_product(client, "apple", 10)
    add_product(client, "pear", 1)

    # apple is taken first; pear then fails, and the 409 rolls the apple line back too.
    response = client.post("/orders", json={"lines": {"apple": 3, "pear": 2}})

    assert response.status_code == 409
    assert "pear: 2 wanted, 1 in stock" in response.text
    assert stored(database_url) == {"stock": {"apple": 10, "pear": 1}, "order_lines": 0, "exports": []}


def test_a_taken_sku_and_an_unknown_product_are_refused(client: FlaskClient, database_url: str) -> None:
    add_product(client, "apple", 10)

    assert client.post("/products", json={"sku": "apple", "name": "Again", "stock": 1}).status_code == 409
    assert client.get("/products/kiwi").status_code == 404
    assert client.post("/orders", json={"lines": {"apple": 1, "kiwi": 1}}).status_code == 404
    assert stored(database_url)["stock"] == {"apple": 10}


def test_the_stock_export_streams_rows_and_records_itself_after_the_body(
    client: FlaskClient, database_url: str
) -> None:
    add_product(client, "pear", 5)
    add_product(client, "apple", 10)

    response = client.get("/products.csv")

    assert response.status_code == 200
    assert response.text == "sku,name,stock\napple,Apple,10\npear,Pear,5\n"
    assert stored(database_url)["exports"] == [2]  # the write made after the status was committed


def test_every_injection_in_a_request_gets_the_same_session(client: FlaskClient) -> None:
    first = client.get("/debug/sessions").json
    second = client.get("/debug/sessions").json

    assert len(set(first.values())) == 1
    assert len(set(second.values())) == 1
    assert first["view"] != second["view"]


def test_the_service_outside_http_in_a_request_scope(app: Flask, database_url: str) -> None:
    """A CLI command or a job uses the same container: each `with request_scope():` is one unit of work."""
    container = app.extensions["container"]
    with request_scope():
        container.service().add_product("apple", "Apple", 10)  # committed at the end of the block

    with request_scope() as scope:
        container.service().add_product("pear", "Pear", 1)
        scope.fail(LookupError("the job decided against it"))  # rolled back: pear never existed

    assert stored(database_url)["stock"] == {"apple": 10}


def test_on_a_real_server(app: Flask, database_url: str) -> None:
    """Served by werkzeug on 127.0.0.1, the same app commits, rolls back and streams."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}", timeout=30) as http:
            assert (
                http.post("/products", json={"sku": "apple", "name": "Apple", "stock": 2}).status_code == 201
            )
            assert http.post("/orders", json={"lines": {"apple": 3}}).status_code == 409
            assert http.post("/orders", json={"lines": {"apple": 2}}).status_code == 201
            assert http.get("/products.csv").text == "sku,name,stock\napple,Apple,0\n"
    finally:
        server.shutdown()  # waits for nothing in flight: each response above was read to its end
        server.server_close()
        thread.join(30)
    assert stored(database_url)["stock"] == {"apple": 0}
