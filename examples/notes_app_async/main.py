"""Build the async app: `uvicorn examples.notes_app_async.main:app`.

SQLite through aiosqlite by default; for PostgreSQL set
NOTES_DATABASE_URL=postgresql+psycopg://user@127.0.0.1:5432/db (psycopg 3 is async too).
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from di_request_scope import RequestScopeMiddleware, container_lifespan

from .containers import Container
from .routes import router

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///notes.sqlite3"


def create_app(database_url: str | None = None) -> FastAPI:
    container = Container()
    container.config.database_url.from_value(
        database_url or os.environ.get("NOTES_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    app = FastAPI(title="Notes (async)", lifespan=container_lifespan(container))
    app.state.container = container
    app.add_middleware(RequestScopeMiddleware)
    app.include_router(router)
    return app


app = create_app()
