"""Business rules, async. Services never commit: the request's unit of work does, by its outcome."""

from __future__ import annotations

from ..notes_app.models import Note, User
from ..notes_app.services import EmailTakenError, InvalidNoteError, UserNotFoundError
from .repositories import NoteRepository, UserRepository

__all__ = ["EmailTakenError", "InvalidNoteError", "NotesService", "UserNotFoundError"]


class NotesService:
    def __init__(self, users: UserRepository, notes: NoteRepository) -> None:
        self.users = users
        self.notes = notes

    async def register(self, email: str, name: str) -> User:
        if await self.users.by_email(email) is not None:
            raise EmailTakenError(email)
        return await self.users.add(email, name)

    async def author(self, user_id: int) -> User:
        user = await self.users.get(user_id)
        if user is None:
            raise UserNotFoundError(user_id)
        return user

    async def add_notes(self, user_id: int, texts: list[str]) -> list[Note]:
        """All or nothing: a blank note fails the request, and the notes added before it roll back."""
        author = await self.author(user_id)
        added = []
        for text in texts:
            if not text.strip():
                raise InvalidNoteError("notes must not be blank")
            added.append(await self.notes.add(author, text))
        return added
