"""HTTP endpoints. Every `Provide[...]` in one request shares the request's Session."""

from typing import Annotated

from dependency_injector.wiring import Provide, inject
from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel
from sqlalchemy.orm import Session

from .containers import Container
from .services import EmailTakenError, InvalidNoteError, NotesService, UserNotFoundError

router = APIRouter()

Service = Annotated[NotesService, Depends(Provide[Container.service])]
DbSession = Annotated[Session, Depends(Provide[Container.session])]


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
def register(body: NewUser, service: Service) -> UserOut:
    try:
        user = service.register(body.email, body.name)
    except EmailTakenError:
        raise HTTPException(409, f"{body.email} is already registered") from None
    return UserOut(id=user.id, email=user.email, name=user.name, notes=[])


@router.get("/users/{user_id}")
@inject
async def read_user(user_id: int, service: Service) -> UserOut:
    try:
        user = service.author(user_id)
    except UserNotFoundError:
        raise HTTPException(404, f"no user {user_id}") from None
    return UserOut(id=user.id, email=user.email, name=user.name, notes=[n.text for n in user.notes])


@router.post("/users/{user_id}/notes", status_code=201)
@inject
def add_notes(user_id: int, texts: list[str], service: Service) -> dict[str, int]:
    try:
        added = service.add_notes(user_id, texts)
    except UserNotFoundError:
        raise HTTPException(404, f"no user {user_id}") from None
    except InvalidNoteError as exc:
        raise HTTPException(422, str(exc)) from None
    return {"added": len(added)}


@router.get("/debug/sessions")
@inject
def sessions(service: Service, first: DbSession, second: DbSession) -> dict[str, int]:
    """Which session each injection got (SQLAlchemy's unique hash_key): all equal, new on each request."""
    return {
        "endpoint_first": first.hash_key,
        "endpoint_second": second.hash_key,
        "user_repository": service.users.session.hash_key,
        "note_repository": service.notes.session.hash_key,
    }
