"""Async HTTP endpoints. Every `Provide[...]` in one request shares the request's AsyncSession.

`Depends(Provide[Container.service])` is spelled exactly as in the sync app. The
service depends on the AsyncSession, which is created asynchronously, so the
provider returns an awaitable; `@inject` awaits every injected awaitable before
it calls an `async def` endpoint, so the endpoint receives the service itself,
never a coroutine (checked with dependency-injector 4.49 and FastAPI 0.165).

No `from __future__ import annotations` in this module: wiring reads the
`Provide[...]` markers from the evaluated `Annotated[...]` annotations. With
string annotations, `@inject` warns "@inject is not required here" and the
endpoint receives the `Provide` marker object instead of the service.
"""

from typing import Annotated

from dependency_injector.wiring import Provide, inject
from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from .containers import Container
from .services import EmailTakenError, InvalidNoteError, NotesService, UserNotFoundError

router = APIRouter()

Service = Annotated[NotesService, Depends(Provide[Container.service])]
DbSession = Annotated[AsyncSession, Depends(Provide[Container.session])]


class NewUser(BaseModel):
    email: str
    name: str


class UserOut(BaseModel):
    id: int
    email: str
    name: str
    notes: list[str]


@router.post("/users", status_code=201)
@inject
async def register(body: NewUser, service: Service) -> UserOut:
    try:
        user = await service.register(body.email, body.name)
    except EmailTakenError:
        raise HTTPException(409, f"{body.email} is already registered") from None
    return UserOut(id=user.id, email=user.email, name=user.name, notes=[])


@router.get("/users/{user_id}")
@inject
async def read_user(user_id: int, service: Service) -> UserOut:
    try:
        user = await service.author(user_id)
    except UserNotFoundError:
        raise HTTPException(404, f"no user {user_id}") from None
    return UserOut(id=user.id, email=user.email, name=user.name, notes=[n.text for n in user.notes])


@router.post("/users/{user_id}/notes", status_code=201)
@inject
async def add_notes(user_id: int, texts: list[str], service: Service) -> dict[str, int]:
    try:
        added = await service.add_notes(user_id, texts)
    except UserNotFoundError:
        raise HTTPException(404, f"no user {user_id}") from None
    except InvalidNoteError as exc:
        raise HTTPException(422, str(exc)) from None
    return {"added": len(added)}


@router.get("/debug/sessions")
@inject
async def sessions(service: Service, first: DbSession, second: DbSession) -> dict[str, int]:
    """Which session each injection got (SQLAlchemy's unique hash_key): all equal, new on each request."""
    return {
        "endpoint_first": first.sync_session.hash_key,
        "endpoint_second": second.sync_session.hash_key,
        "user_repository": service.users.session.sync_session.hash_key,
        "note_repository": service.notes.session.sync_session.hash_key,
    }
