"""Build the app: `flask --app examples.flask_app.main:create_app run`, or create_app() in a WSGI server."""

from __future__ import annotations

import os

from flask import Flask

from di_request_scope.wsgi import RequestScopeWSGIMiddleware

from . import views
from .containers import Container

DEFAULT_DATABASE_URL = "sqlite:///shop.sqlite3"


def create_app(database_url: str | None = None) -> Flask:
    container = Container()  # wires .views (wiring_config)
    container.config.database_url.from_value(
        database_url or os.environ.get("SHOP_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    container.init_resources()  # the engine, and the tables; container.shutdown_resources() disposes
    app = Flask(__name__)
    app.extensions["container"] = container
    app.register_blueprint(views.blueprint)
    # One request scope per request, around Flask itself: the view, the streamed body and
    # Flask's own response callbacks all run inside it.
    app.wsgi_app = RequestScopeWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app
