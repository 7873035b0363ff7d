"""Repositories: each gets the request's session injected; none of them commits."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import Note, User


class UserRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, email: str, name: str) -> User:
        user = User(email=email, name=name)
        self.session.add(user)
        self.session.flush()  # assigns the id; the commit belongs to the request
        return user

    def get(self, user_id: int) -> User | None:
        return self.session.get(User, user_id)

    def by_email(self, email: str) -> User | None:
        return self.session.scalar(select(User).where(User.email == email))


class NoteRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, author: User, text: str) -> Note:
        note = Note(author=author, text=text)
        self.session.add(note)
        self.session.flush()
        return note

    def count(self) -> int:
        return self.session.scalar(select(func.count()).select_from(Note)) or 0
