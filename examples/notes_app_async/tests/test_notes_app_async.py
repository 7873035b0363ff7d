"""Tests of the async notes service, on aiosqlite and on PostgreSQL (psycopg 3, async).

Run: `.venv/bin/pytest examples/notes_app_async -q`

Most tests drive the app with Starlette's TestClient, which runs the lifespan and
the app's event loop in a thread of its own, so the tests themselves stay plain
functions. One test sends concurrent requests from an async test through
httpx's ASGITransport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dependency_injector import providers
from fastapi import FastAPI
from sqlalchemy import create_engine, make_url, select
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

from examples.notes_app.models import Note, User
from examples.notes_app_async.main import create_app
from examples.notes_app_async.services import NotesService


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An async URL: a fresh SQLite file through aiosqlite, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/notes.sqlite3"
    return str(request.getfixturevalue("postgres_schema_url"))  # postgresql+psycopg: sync and async


@pytest.fixture
def app(database_url: str) -> FastAPI:
    return create_app(database_url)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def stored(database_url: str) -> dict[str, list[str]]:
    """What is committed, read through a sync connection of its own: {email: [note texts]}."""
    url = make_url(database_url)
    if url.drivername == "sqlite+aiosqlite":
        url = url.set(drivername="sqlite")
    engine = create_engine(url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            users = session.scalars(select(User).options(selectinload(User.notes))).all()
            return {user.email: [note.text for note in user.notes] for user in users}
    finally:
        engine.dispose()


def register(client: TestClient, email: str = "ada@example.com", name: str = "Ada") -> int:
    response = client.post("/users", json={"email": email, "name": name})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_register_add_notes_and_read_them_back(client: TestClient, database_url: str) -> None:
    user_id = register(client)
    response = client.post(f"/users/{user_id}/notes", json=["buy milk", "call Bob"])
    assert response.status_code == 201
    assert response.json() == {"added": 2}
    assert client.get(f"/users/{user_id}").json() == {
        "id": user_id,
        "email": "ada@example.com",
        "name": "Ada",
        "notes": ["buy milk", "call Bob"],
    }
    assert stored(database_url) == {"ada@example.com": ["buy milk", "call Bob"]}


def test_unknown_user_is_404(client: TestClient) -> None:
    assert client.get("/users/999").status_code == 404
    assert client.post("/users/999/notes", json=["lost"]).status_code == 404


def test_taken_email_is_refused_with_409(client: TestClient, database_url: str) -> None:
    register(client)
    response = client.post("/users", json={"email": "ada@example.com", "name": "Imposter"})
    assert response.status_code == 409
    assert stored(database_url) == {"ada@example.com": []}


def test_a_blank_note_rolls_back_the_notes_added_before_it(client: TestClient, database_url: str) -> None:
    user_id = register(client)
    assert client.post(f"/users/{user_id}/notes", json=["buy milk"]).status_code == 201
    response = client.post(f"/users/{user_id}/notes", json=["write report", "  "])
    assert response.status_code == 422
    assert client.get(f"/users/{user_id}").json()["notes"] == ["buy milk"]
    assert stored(database_url) == {"ada@example.com": ["buy milk"]}


def test_one_session_per_request_and_a_new_one_for_the_next(client: TestClient) -> None:
    first = client.get("/debug/sessions").json()
    second = client.get("/debug/sessions").json()
    assert len(first) == 4
    assert len(set(first.values())) == 1
    assert len(set(second.values())) == 1
    assert first["endpoint_first"] != second["endpoint_first"]


@pytest.mark.anyio
async def test_concurrent_requests_each_get_their_own_session(app: FastAPI) -> None:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://notes") as client,
    ):
        responses = await asyncio.gather(*(client.get("/debug/sessions") for _ in range(20)))
    keys: list[int] = []
    for response in responses:
        assert response.status_code == 200
        injected = set(response.json().values())
        assert len(injected) == 1  # one session shared by every injection of the request
        keys.extend(injected)
    assert len(set(keys)) == 20  # and no two requests shared one


class FakeUserRepository:
    """An in-memory async UserRepository: the same methods, no database."""

    def __init__(self, rows: dict[int, User]) -> None:
        self.rows = rows

    async def add(self, email: str, name: str) -> User:
        user = User(id=len(self.rows) + 1, email=email, name=name, notes=[])
        self.rows[user.id] = user
        return user

    async def get(self, user_id: int) -> User | None:
        return self.rows.get(user_id)

    async def by_email(self, email: str) -> User | None:
        return next((user for user in self.rows.values() if user.email == email), None)


def test_a_fake_user_repository_replaces_the_real_one(
    app: FastAPI, client: TestClient, database_url: str
) -> None:
    container = app.state.container
    rows: dict[int, User] = {}
    fake = providers.Factory(FakeUserRepository, rows=rows)
    # The real `users` provider is async: its session is created asynchronously. Give its
    # stand-in the same shape. dependency-injector fixes a provider's async mode at its first
    # call, and a sync fake would pin `users` to sync mode: once the override is reset, the
    # real repository would be handed an un-awaited session.
    fake.enable_async_mode()
    container.users.override(fake)
    try:
        user_id = register(client, "fake@example.com", "Fake")
        assert rows[user_id].email == "fake@example.com"
        assert client.get(f"/users/{user_id}").json()["email"] == "fake@example.com"
        assert client.post("/users", json={"email": "fake@example.com", "name": "Again"}).status_code == 409
        assert stored(database_url) == {}
    finally:
        container.users.reset_override()

    register(client, "real@example.com", "Real")
    assert stored(database_url) == {"real@example.com": []}


class NotesServiceWithAFailingMailer(NotesService):
    async def add_notes(self, user_id: int, texts: list[str]) -> list[Note]:
        await super().add_notes(user_id, texts)
        raise RuntimeError("mail server down")


def test_an_unexpected_error_after_writes_rolls_them_back(
    app: FastAPI, client: TestClient, database_url: str
) -> None:
    container = app.state.container
    user_id = register(client)
    failing = providers.Factory(NotesServiceWithAFailingMailer, users=container.users, notes=container.notes)
    with container.service.override(failing):
        with pytest.raises(RuntimeError, match="mail server down"):
            client.post(f"/users/{user_id}/notes", json=["never saved"])
        assert stored(database_url) == {"ada@example.com": []}
    assert client.post(f"/users/{user_id}/notes", json=["saved"]).status_code == 201
    assert stored(database_url) == {"ada@example.com": ["saved"]}
