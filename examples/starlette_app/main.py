"""Build the app: `uvicorn examples.starlette_app.main:app`."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from di_request_scope import RequestScopeMiddleware, container_lifespan

from ..notes_app.services import EmailTakenError, InvalidNoteError, UserNotFoundError
from .containers import Container
from .routes import routes

DEFAULT_DATABASE_URL = "sqlite:///notes.sqlite3"


# Exception handlers answer inside the middleware: it sees their 4xx status and rolls back.
async def user_not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"no user {exc}"}, status_code=404)


async def email_taken(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"{exc} is already registered"}, status_code=409)


async def invalid_note(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


# --8<-- [start:app]
def create_app(database_url: str | None = None) -> Starlette:
    container = Container()
    container.config.database_url.from_value(
        database_url or os.environ.get("NOTES_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    app = Starlette(
        routes=routes,
        # First in the list: the outermost of the app's middleware, so all of them share the scope.
        middleware=[Middleware(RequestScopeMiddleware)],
        exception_handlers={
            UserNotFoundError: user_not_found,
            EmailTakenError: email_taken,
            InvalidNoteError: invalid_note,
        },
        lifespan=container_lifespan(container),
    )
    app.state.container = container
    return app


# --8<-- [end:app]


app = create_app()
