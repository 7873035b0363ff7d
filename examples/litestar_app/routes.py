"""Litestar handlers. Their parameters are Litestar dependencies, resolved from the container."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from litestar import get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.response import Stream
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..notes_app.models import Note
from ..notes_app.services import NotesService


@dataclass
class NewUser:
    email: str
    name: str


@dataclass
class UserOut:
    id: int
    email: str
    name: str
    notes: list[str]


# --8<-- [start:handlers]
# Sync handlers state where they run: `sync_to_thread=True` runs them in a worker thread
# (they block on the database), where they get the request's session like any other.
@post("/users", sync_to_thread=True)
def register(data: JSONBody[NewUser], service: NamedDependency[NotesService]) -> UserOut:
    user = service.register(data.email, data.name)  # EmailTakenError: a 409, see main.py
    return UserOut(id=user.id, email=user.email, name=user.name, notes=[])


# An async handler gets the same session; its two short SQLite reads block the event loop briefly.
@get("/users/{user_id:int}")
async def read_user(user_id: FromPath[int], service: NamedDependency[NotesService]) -> UserOut:
    user = service.author(user_id)  # UserNotFoundError: a 404
    return UserOut(id=user.id, email=user.email, name=user.name, notes=[note.text for note in user.notes])


# --8<-- [end:handlers]


@post("/users/{user_id:int}/notes", sync_to_thread=True)
def add_notes(
    user_id: FromPath[int], data: JSONBody[list[str]], service: NamedDependency[NotesService]
) -> dict[str, int]:
    return {"added": len(service.add_notes(user_id, data))}  # InvalidNoteError: a 422


# --8<-- [start:stream]
@get("/users/{user_id:int}/notes.txt", sync_to_thread=True)
def export_notes(
    user_id: FromPath[int], service: NamedDependency[NotesService], session: NamedDependency[Session]
) -> Stream:
    """The body reads the notes with the request's session, which stays open until the last line is sent."""
    service.author(user_id)  # an unknown user is a 404, not a stream

    def lines() -> Iterator[str]:  # Litestar iterates a sync body in a worker thread
        for note in session.scalars(select(Note).where(Note.author_id == user_id).order_by(Note.id)):
            yield f"{note.text}\n"

    return Stream(lines(), media_type="text/plain")


# --8<-- [end:stream]


def injected(service: NotesService, session: Session) -> dict[str, Any]:
    """Which session each injection got (SQLAlchemy's unique hash_key), and the handler's thread."""
    return {
        "sessions": {
            "handler": session.hash_key,
            "user_repository": service.users.session.hash_key,
            "note_repository": service.notes.session.hash_key,
        },
        "thread": threading.get_ident(),
    }


@get("/debug/sessions")
async def debug_sessions(
    service: NamedDependency[NotesService], session: NamedDependency[Session]
) -> dict[str, Any]:
    return injected(service, session)


@get("/debug/sessions-sync", sync_to_thread=True)
def debug_sessions_sync(
    service: NamedDependency[NotesService], session: NamedDependency[Session]
) -> dict[str, Any]:
    return injected(service, session)


route_handlers = [register, read_user, add_notes, export_notes, debug_sessions, debug_sessions_sync]
