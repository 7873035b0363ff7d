"""Tests of the notes service, as its authors would write them.

Run: `.venv/bin/pytest examples/notes_app -q`

Most tests run on one database per module (conftest.py), each inside a
transaction that di_request_scope's pytest plugin rolls back after the test:
the `app` fixture binds the app's `session_factory` to `di_transaction`, so the
app commits as in production, but its commits only release SAVEPOINTs. Every
test therefore starts from empty tables (each one registers ada@example.com
again) and leaves nothing behind. What the app wrote is read through the test's
own connection (`stored()`), which sees exactly what the app committed.

The tests at the end need real commits (what another connection sees, the
engine's pool): they build the app on a fresh database of their own, without the
transaction.

`create_app()` wires the routes to the container it creates, so the newest app
owns the routes: build one app per test and finish with it before building another.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dependency_injector import providers
from fastapi import FastAPI
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, selectinload, sessionmaker
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

from di_request_scope.testing import Overrides, RolledBackTransaction, override
from examples.notes_app.containers import Container
from examples.notes_app.main import create_app
from examples.notes_app.models import Base, Note, User
from examples.notes_app.services import NotesService


# --8<-- [start:app]
@pytest.fixture
def app(database_url: str, di_transaction: RolledBackTransaction) -> FastAPI:
    app = create_app(database_url)
    # Every request's session joins the test's transaction: rolled back after the test.
    di_transaction.bind(app.state.container.session_factory)
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:  # `with` runs the lifespan
        yield client


def stored(transaction: RolledBackTransaction) -> dict[str, list[str]]:
    """What the app committed, read through the test's connection: {email: [note texts]}."""
    with transaction.session_factory() as session:
        users = session.scalars(select(User).options(selectinload(User.notes))).all()
        return {user.email: [note.text for note in user.notes] for user in users}


# --8<-- [end:app]


def register(client: TestClient, email: str = "ada@example.com", name: str = "Ada") -> int:
    response = client.post("/users", json={"email": email, "name": name})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_register_add_notes_and_read_them_back(
    client: TestClient, di_transaction: RolledBackTransaction
) -> None:
    user_id = register(client)
    assert client.get(f"/users/{user_id}").json() == {
        "id": user_id,
        "email": "ada@example.com",
        "name": "Ada",
        "notes": [],
    }

    response = client.post(f"/users/{user_id}/notes", json=["buy milk", "call Bob"])
    assert response.status_code == 201
    assert response.json() == {"added": 2}

    assert client.get(f"/users/{user_id}").json()["notes"] == ["buy milk", "call Bob"]
    assert stored(di_transaction) == {"ada@example.com": ["buy milk", "call Bob"]}


def test_unknown_user_is_404(client: TestClient) -> None:
    assert client.get("/users/999").status_code == 404
    assert client.post("/users/999/notes", json=["lost"]).status_code == 404


def test_taken_email_is_refused_with_409(client: TestClient, di_transaction: RolledBackTransaction) -> None:
    register(client, "ada@example.com", "Ada")
    response = client.post("/users", json={"email": "ada@example.com", "name": "Imposter"})
    assert response.status_code == 409
    assert response.json() == {"detail": "ada@example.com is already registered"}
    assert stored(di_transaction) == {"ada@example.com": []}


def test_a_blank_note_rolls_back_the_notes_added_before_it(
    client: TestClient, di_transaction: RolledBackTransaction
) -> None:
    user_id = register(client)
    assert client.post(f"/users/{user_id}/notes", json=["buy milk"]).status_code == 201

    # "write report" is flushed to the database before the blank note fails the request.
    response = client.post(f"/users/{user_id}/notes", json=["write report", "  "])
    assert response.status_code == 422
    assert response.json() == {"detail": "notes must not be blank"}

    assert client.get(f"/users/{user_id}").json()["notes"] == ["buy milk"]
    assert stored(di_transaction) == {"ada@example.com": ["buy milk"]}


def test_one_session_per_request_and_a_new_one_for_the_next(client: TestClient) -> None:
    first = client.get("/debug/sessions").json()
    second = client.get("/debug/sessions").json()
    # The endpoint's two parameters, the service's repositories: one session per request.
    assert set(first) == {"endpoint_first", "endpoint_second", "user_repository", "note_repository"}
    assert len(set(first.values())) == 1
    assert len(set(second.values())) == 1
    assert first["endpoint_first"] != second["endpoint_first"]


# --8<-- [start:di_scope]
@pytest.fixture
def container(database_url: str, di_transaction: RolledBackTransaction) -> Container:
    """The container alone, for tests below HTTP: no app, no lifespan."""
    container = Container()
    container.config.database_url.from_value(database_url)
    di_transaction.bind(container.session_factory)
    return container


@pytest.mark.usefixtures("di_scope")  # the test body is one request scope
def test_the_service_and_its_repositories_share_the_scopes_session(container: Container) -> None:
    service = container.service()
    assert service.users.session is service.notes.session is container.session()

    user = service.register("ada@example.com", "Ada")
    service.add_notes(user.id, ["buy milk", "call Bob"])
    assert container.notes().count() == 2
    assert [note.text for note in service.author(user.id).notes] == ["buy milk", "call Bob"]


# --8<-- [end:di_scope]


class FakeUserRepository:
    """An in-memory UserRepository: the same methods, no database."""

    def __init__(self, rows: dict[int, User]) -> None:
        self.rows = rows

    def add(self, email: str, name: str) -> User:
        user = User(id=len(self.rows) + 1, email=email, name=name)
        self.rows[user.id] = user
        return user

    def get(self, user_id: int) -> User | None:
        return self.rows.get(user_id)

    def by_email(self, email: str) -> User | None:
        return next((user for user in self.rows.values() if user.email == email), None)


# --8<-- [start:di_override]
def test_a_fake_user_repository_replaces_the_real_one(
    app: FastAPI, client: TestClient, di_override: Overrides, di_transaction: RolledBackTransaction
) -> None:
    rows: dict[int, User] = {}
    di_override(
        app.state.container.users, providers.Factory(FakeUserRepository, rows=rows)
    )  # until the test ends

    user_id = register(client, "fake@example.com", "Fake")
    assert rows[user_id].email == "fake@example.com"
    assert client.get(f"/users/{user_id}").json()["email"] == "fake@example.com"
    assert client.post("/users", json={"email": "fake@example.com", "name": "Again"}).status_code == 409
    assert stored(di_transaction) == {}  # the service never reached the database


# --8<-- [end:di_override]


class NotesServiceWithAFailingMailer(NotesService):
    """Adds the notes, then fails the way an unexpected bug or outage would."""

    def add_notes(self, user_id: int, texts: list[str]) -> list[Note]:
        super().add_notes(user_id, texts)
        raise RuntimeError("mail server down")


def test_an_unexpected_error_after_writes_rolls_them_back(
    app: FastAPI, client: TestClient, di_transaction: RolledBackTransaction
) -> None:
    container = app.state.container
    user_id = register(client)
    failing = providers.Factory(NotesServiceWithAFailingMailer, users=container.users, notes=container.notes)
    with override(container.service, failing):  # for this block only
        # TestClient re-raises the app's exception; a real server would answer 500.
        with pytest.raises(RuntimeError, match="mail server down"):
            client.post(f"/users/{user_id}/notes", json=["never saved"])
        assert stored(di_transaction) == {"ada@example.com": []}

    # Leaving the `with` block restored the real service.
    assert client.post(f"/users/{user_id}/notes", json=["saved"]).status_code == 201
    assert stored(di_transaction) == {"ada@example.com": ["saved"]}


# Real commits: a fresh database per test, and no transaction around the app.


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database for one test: a fresh SQLite file, or a fresh schema on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/notes.sqlite3"
    return str(request.getfixturevalue("postgres_schema_url"))


def committed(database_url: str) -> dict[str, list[str]]:
    """What is committed, read through a connection of its own: {email: [note texts]}."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            users = session.scalars(select(User).options(selectinload(User.notes))).all()
            return {user.email: [note.text for note in user.notes] for user in users}
    finally:
        engine.dispose()


def test_requests_commit_or_roll_back_and_return_their_connections(fresh_database_url: str) -> None:
    app = create_app(fresh_database_url)
    with TestClient(app) as client:
        user_id = register(client)
        assert client.post(f"/users/{user_id}/notes", json=["buy milk"]).status_code == 201
        assert client.post(f"/users/{user_id}/notes", json=["write report", "  "]).status_code == 422
        assert committed(fresh_database_url) == {"ada@example.com": ["buy milk"]}
        assert app.state.container.engine().pool.checkedout() == 0  # every session was closed


def test_sessions_can_come_from_a_test_engine(
    tmp_path: Path, fresh_database_url: str, di_override: Overrides
) -> None:
    """Override the sessionmaker: every request's session binds to an engine the test built."""
    test_url = f"sqlite:///{tmp_path}/test-engine.sqlite3"
    test_engine = create_engine(test_url)
    Base.metadata.create_all(test_engine)
    app = create_app(fresh_database_url)
    di_override(app.state.container.session_factory, sessionmaker(bind=test_engine))
    try:
        with TestClient(app) as client:
            user_id = register(client)
            assert client.post(f"/users/{user_id}/notes", json=["on the test engine"]).status_code == 201
    finally:
        test_engine.dispose()
    assert committed(test_url) == {"ada@example.com": ["on the test engine"]}
    assert committed(fresh_database_url) == {}  # the configured database was not touched


@pytest.mark.server
def test_the_demo_runs_and_every_expectation_holds(capsys: pytest.CaptureFixture[str]) -> None:
    from examples.notes_app import demo

    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "All expectations held." in out
    assert "FAIL" not in out
