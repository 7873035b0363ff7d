"""Business rules. Services never commit: the request's unit of work does, by its outcome."""

from __future__ import annotations

from .models import Note, User
from .repositories import NoteRepository, UserRepository


class EmailTakenError(Exception):
    pass


class UserNotFoundError(Exception):
    pass


class InvalidNoteError(Exception):
    pass


class NotesService:
    def __init__(self, users: UserRepository, notes: NoteRepository) -> None:
        self.users = users
        self.notes = notes

    def register(self, email: str, name: str) -> User:
        if self.users.by_email(email) is not None:
            raise EmailTakenError(email)
        return self.users.add(email, name)

    def author(self, user_id: int) -> User:
        user = self.users.get(user_id)
        if user is None:
            raise UserNotFoundError(user_id)
        return user

    def add_notes(self, user_id: int, texts: list[str]) -> list[Note]:
        """All or nothing: a blank note fails the request, and the notes added before it roll back."""
        author = self.author(user_id)
        added = []
        for text in texts:
            if not text.strip():
                raise InvalidNoteError("notes must not be blank")
            added.append(self.notes.add(author, text))
        return added
