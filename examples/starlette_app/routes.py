"""Starlette endpoints: `Provide[...]` defaults, injected by `@inject` in async and sync endpoints alike."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from dependency_injector.wiring import Provide, inject
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..notes_app.models import Note, User
from ..notes_app.services import NotesService
from .containers import Container


def user_out(user: User, notes: list[str]) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "name": user.name, "notes": notes}


# --8<-- [start:endpoints]
@inject
async def register(request: Request, service: NotesService = Provide[Container.service]) -> JSONResponse:
    body = await request.json()
    # The service blocks on the database: run it in the threadpool, where it keeps the request's session.
    user = await run_in_threadpool(service.register, body["email"], body["name"])
    return JSONResponse(user_out(user, []), status_code=201)


@inject
def read_user(request: Request, service: NotesService = Provide[Container.service]) -> JSONResponse:
    """A sync endpoint: Starlette runs it, and @inject, in its threadpool; it gets the same session."""
    user = service.author(request.path_params["user_id"])  # UserNotFoundError: a 404, see main.py
    return JSONResponse(user_out(user, [note.text for note in user.notes]))


# --8<-- [end:endpoints]


@inject
async def add_notes(request: Request, service: NotesService = Provide[Container.service]) -> JSONResponse:
    texts = await request.json()
    added = await run_in_threadpool(service.add_notes, request.path_params["user_id"], texts)
    return JSONResponse({"added": len(added)}, status_code=201)


# --8<-- [start:stream]
@inject
def export_notes(
    request: Request,
    service: NotesService = Provide[Container.service],
    session: Session = Provide[Container.session],
) -> StreamingResponse:
    """The body reads the notes with the request's session, which stays open until the last line is sent."""
    user_id = service.author(request.path_params["user_id"]).id  # an unknown user is a 404, not a stream

    def lines() -> Iterator[str]:
        for note in session.scalars(select(Note).where(Note.author_id == user_id).order_by(Note.id)):
            yield f"{note.text}\n"

    return StreamingResponse(lines(), media_type="text/plain")


# --8<-- [end:stream]


def injected(service: NotesService, first: Session, second: Session) -> dict[str, Any]:
    """Which session each injection got (SQLAlchemy's unique hash_key), and the endpoint's thread."""
    return {
        "sessions": {
            "endpoint_first": first.hash_key,
            "endpoint_second": second.hash_key,
            "user_repository": service.users.session.hash_key,
            "note_repository": service.notes.session.hash_key,
        },
        "thread": threading.get_ident(),
    }


@inject
async def debug_sessions(
    request: Request,
    service: NotesService = Provide[Container.service],
    first: Session = Provide[Container.session],
    second: Session = Provide[Container.session],
) -> JSONResponse:
    return JSONResponse(injected(service, first, second))


@inject
def debug_sessions_sync(
    request: Request,
    service: NotesService = Provide[Container.service],
    first: Session = Provide[Container.session],
    second: Session = Provide[Container.session],
) -> JSONResponse:
    return JSONResponse(injected(service, first, second))


routes = [
    Route("/users", register, methods=["POST"]),
    Route("/users/{user_id:int}", read_user),
    Route("/users/{user_id:int}/notes", add_notes, methods=["POST"]),
    Route("/users/{user_id:int}/notes.txt", export_notes),
    Route("/debug/sessions", debug_sessions),
    Route("/debug/sessions-sync", debug_sessions_sync),
]
