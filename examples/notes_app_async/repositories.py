"""Async repositories: each gets the request's AsyncSession injected; none of them commits."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from ..notes_app.models import Note, User


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, email: str, name: str) -> User:
        user = User(email=email, name=name, notes=[])  # a loaded, empty collection: nothing to lazy-load
        self.session.add(user)
        await self.session.flush()  # assigns the id; the commit belongs to the request
        return user

    async def get(self, user_id: int) -> User | None:
        # AsyncSession cannot load lazily on attribute access: load the notes with the user.
        return await self.session.get(User, user_id, options=[selectinload(User.notes)])

    async def by_email(self, email: str) -> User | None:
        return await self.session.scalar(select(User).where(User.email == email))


class NoteRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, author: User, text: str) -> Note:
        note = Note(author=author, text=text)
        self.session.add(note)
        await self.session.flush()
        return note
