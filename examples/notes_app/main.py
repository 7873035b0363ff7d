"""Build the app: `uvicorn examples.notes_app.main:app`, or `python3 dev.py serve`."""

from __future__ import annotations

import os

from fastapi import FastAPI

from di_request_scope import RequestScopeMiddleware, container_lifespan

from .containers import Container
from .routes import router

DEFAULT_DATABASE_URL = "sqlite:///notes.sqlite3"


def create_app(database_url: str | None = None) -> FastAPI:
    container = Container()
    container.config.database_url.from_value(
        database_url or os.environ.get("NOTES_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    app = FastAPI(title="Notes", lifespan=container_lifespan(container))
    app.state.container = container
    app.add_middleware(RequestScopeMiddleware)
    app.include_router(router)
    return app


app = create_app()
