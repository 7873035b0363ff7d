"""Build the app: `uvicorn examples.litestar_app.main:app`."""

from __future__ import annotations

import logging
import os
from typing import Any

from litestar import Litestar, Request, Response
from litestar.datastructures import State

from di_request_scope import RequestScopeMiddleware, container_lifespan

from ..notes_app.services import EmailTakenError, InvalidNoteError, UserNotFoundError
from .containers import Container
from .dependencies import provide
from .routes import route_handlers

DEFAULT_DATABASE_URL = "sqlite:///notes.sqlite3"

logger = logging.getLogger(__name__)


# Exception handlers answer inside the middleware: it sees their 4xx status and rolls back.
def user_not_found(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    return Response({"detail": f"no user {exc}"}, status_code=404)


def email_taken(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    return Response({"detail": f"{exc} is already registered"}, status_code=409)


def invalid_note(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    return Response({"detail": str(exc)}, status_code=422)


# --8<-- [start:internal_error]
def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    """Any other exception: Litestar answers it, and the middleware sees only the 500. Log it here."""
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return Response({"detail": "Internal Server Error"}, status_code=500)


# --8<-- [end:internal_error]


# --8<-- [start:app]
def create_app(database_url: str | None = None) -> Litestar:
    container = Container()
    container.config.database_url.from_value(
        database_url or os.environ.get("NOTES_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    return Litestar(
        route_handlers=route_handlers,
        dependencies={"service": provide(container.service), "session": provide(container.session)},
        middleware=[RequestScopeMiddleware],
        exception_handlers={
            UserNotFoundError: user_not_found,
            EmailTakenError: email_taken,
            InvalidNoteError: invalid_note,
            500: internal_error,
        },
        lifespan=[container_lifespan(container)],
        state=State({"container": container}),
        # Logging is the server's to configure (uvicorn --log-config); Litestar's default
        # would take over the root logger and start a log thread per app.
        logging_config=None,
    )


# --8<-- [end:app]


app = create_app()
