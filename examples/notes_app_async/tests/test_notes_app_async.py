"""Tests of the async notes service, on aiosqlite and on PostgreSQL (psycopg 3, async).

Run: `.venv/bin/pytest examples/notes_app_async -q`

Most tests are async and run on one database per module (conftest.py), each
inside a transaction that di_request_scope's pytest plugin rolls back after the
test (`di_async_transaction`). The connection belongs to the test's event loop,
so the app runs on it too: the tests drive it through httpx's ASGITransport, not
Starlette's TestClient (which runs the app on a loop of its own). The app's
commits only release SAVEPOINTs; what it wrote is read through the test's
connection.

The tests at the end need real commits or concurrent requests (one connection
cannot serve overlapping requests): they use a fresh database, without the
transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from dependency_injector import providers
from fastapi import FastAPI
from sqlalchemy import create_engine, make_url, select
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

from di_request_scope.testing import AsyncRolledBackTransaction, override
from examples.notes_app.models import Note, User
from examples.notes_app_async.containers import Container
from examples.notes_app_async.main import create_app
from examples.notes_app_async.services import NotesService

pytestmark = pytest.mark.anyio


# --8<-- [start:app]
@pytest.fixture
def app(database_url: str, di_async_transaction: AsyncRolledBackTransaction) -> FastAPI:
    app = create_app(database_url)
    di_async_transaction.bind(app.state.container.session_factory)
    return app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app on the test's event loop, lifespan included."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://notes") as client,
    ):
        yield client


async def stored(transaction: AsyncRolledBackTransaction) -> dict[str, list[str]]:
    """What the app committed, read through the test's connection: {email: [note texts]}."""
    async with transaction.session_factory() as session:
        users = (await session.scalars(select(User).options(selectinload(User.notes)))).all()
        return {user.email: [note.text for note in user.notes] for user in users}


# --8<-- [end:app]


async def register(client: httpx.AsyncClient, email: str = "ada@example.com", name: str = "Ada") -> int:
    response = await client.post("/users", json={"email": email, "name": name})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


async def test_register_add_notes_and_read_them_back(
    client: httpx.AsyncClient, di_async_transaction: AsyncRolledBackTransaction
) -> None:
    user_id = await register(client)
    response = await client.post(f"/users/{user_id}/notes", json=["buy milk", "call Bob"])
    assert response.status_code == 201
    assert response.json() == {"added": 2}
    assert (await client.get(f"/users/{user_id}")).json() == {
        "id": user_id,
        "email": "ada@example.com",
        "name": "Ada",
        "notes": ["buy milk", "call Bob"],
    }
    assert await stored(di_async_transaction) == {"ada@example.com": ["buy milk", "call Bob"]}


async def test_unknown_user_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/users/999")).status_code == 404
    assert (await client.post("/users/999/notes", json=["lost"])).status_code == 404


async def test_taken_email_is_refused_with_409(
    client: httpx.AsyncClient, di_async_transaction: AsyncRolledBackTransaction
) -> None:
    await register(client)
    response = await client.post("/users", json={"email": "ada@example.com", "name": "Imposter"})
    assert response.status_code == 409
    assert await stored(di_async_transaction) == {"ada@example.com": []}


async def test_a_blank_note_rolls_back_the_notes_added_before_it(
    client: httpx.AsyncClient, di_async_transaction: AsyncRolledBackTransaction
) -> None:
    user_id = await register(client)
    assert (await client.post(f"/users/{user_id}/notes", json=["buy milk"])).status_code == 201
    response = await client.post(f"/users/{user_id}/notes", json=["write report", "  "])
    assert response.status_code == 422
    assert (await client.get(f"/users/{user_id}")).json()["notes"] == ["buy milk"]
    assert await stored(di_async_transaction) == {"ada@example.com": ["buy milk"]}


async def test_one_session_per_request_and_a_new_one_for_the_next(client: httpx.AsyncClient) -> None:
    first = (await client.get("/debug/sessions")).json()
    second = (await client.get("/debug/sessions")).json()
    assert len(first) == 4
    assert len(set(first.values())) == 1
    assert len(set(second.values())) == 1
    assert first["endpoint_first"] != second["endpoint_first"]


@pytest.mark.usefixtures("di_scope")  # the test body is one request scope, on the test's loop
async def test_the_service_and_its_repositories_share_the_scopes_session(
    database_url: str, di_async_transaction: AsyncRolledBackTransaction
) -> None:
    container = Container()
    container.config.database_url.from_value(database_url)
    di_async_transaction.bind(container.session_factory)

    service = await container.service()
    assert service.users.session is service.notes.session is await container.session()
    user = await service.register("ada@example.com", "Ada")
    await service.add_notes(user.id, ["buy milk"])
    assert [note.text for note in (await service.author(user.id)).notes] == ["buy milk"]


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


async def test_a_fake_user_repository_replaces_the_real_one(
    app: FastAPI, client: httpx.AsyncClient, di_async_transaction: AsyncRolledBackTransaction
) -> None:
    container = app.state.container
    rows: dict[int, User] = {}
    # A plain sync Factory: `override` restores the async mode it pins on `users` when the block
    # ends, so the real repository is handed an awaited session again afterwards.
    with override(container.users, providers.Factory(FakeUserRepository, rows=rows)):
        user_id = await register(client, "fake@example.com", "Fake")
        assert rows[user_id].email == "fake@example.com"
        assert (await client.get(f"/users/{user_id}")).json()["email"] == "fake@example.com"
        assert (
            await client.post("/users", json={"email": "fake@example.com", "name": "Again"})
        ).status_code == 409
        assert await stored(di_async_transaction) == {}

    await register(client, "real@example.com", "Real")
    assert await stored(di_async_transaction) == {"real@example.com": []}


class NotesServiceWithAFailingMailer(NotesService):
    async def add_notes(self, user_id: int, texts: list[str]) -> list[Note]:
        await super().add_notes(user_id, texts)
        raise RuntimeError("mail server down")


async def test_an_unexpected_error_after_writes_rolls_them_back(
    app: FastAPI, client: httpx.AsyncClient, di_async_transaction: AsyncRolledBackTransaction
) -> None:
    container = app.state.container
    user_id = await register(client)
    failing = providers.Factory(NotesServiceWithAFailingMailer, users=container.users, notes=container.notes)
    with override(container.service, failing):
        with pytest.raises(RuntimeError, match="mail server down"):  # ASGITransport re-raises it
            await client.post(f"/users/{user_id}/notes", json=["never saved"])
        assert await stored(di_async_transaction) == {"ada@example.com": []}
    assert (await client.post(f"/users/{user_id}/notes", json=["saved"])).status_code == 201
    assert await stored(di_async_transaction) == {"ada@example.com": ["saved"]}


# Real commits and concurrent requests: a fresh database per test, no transaction around the app.


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/notes.sqlite3"
    return str(request.getfixturevalue("postgres_schema_url"))  # postgresql+psycopg: sync and async


@pytest.fixture
def fresh_client(fresh_database_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(fresh_database_url)) as client:  # the app on a loop of its own
        yield client


def committed(database_url: str) -> dict[str, list[str]]:
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


def test_requests_commit_or_roll_back(fresh_client: TestClient, fresh_database_url: str) -> None:
    response = fresh_client.post("/users", json={"email": "ada@example.com", "name": "Ada"})
    user_id = response.json()["id"]
    assert fresh_client.post(f"/users/{user_id}/notes", json=["buy milk"]).status_code == 201
    assert fresh_client.post(f"/users/{user_id}/notes", json=["write report", "  "]).status_code == 422
    assert committed(fresh_database_url) == {"ada@example.com": ["buy milk"]}


async def test_concurrent_requests_each_get_their_own_session(fresh_database_url: str) -> None:
    app = create_app(fresh_database_url)
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
