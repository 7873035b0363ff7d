"""The command-line job: one unit of work per user, on a real SQLite file, through main(argv)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

from examples import job
from examples.notes_app.main import create_app
from examples.notes_app.models import User


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/notes.sqlite3"


def write_csv(path: Path, *lines: str) -> str:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return str(path)


def stored(database_url: str) -> dict[str, list[str]]:
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            users = session.scalars(select(User).options(selectinload(User.notes))).all()
            return {user.email: [note.text for note in user.notes] for user in users}
    finally:
        engine.dispose()


@pytest.fixture
def disposed_engines() -> Iterator[list[Engine]]:
    """Every engine disposed during the test, seen through SQLAlchemy's engine_disposed event."""
    disposed: list[Engine] = []

    def record(engine: Engine) -> None:
        disposed.append(engine)

    event.listen(Engine, "engine_disposed", record)
    try:
        yield disposed
    finally:
        event.remove(Engine, "engine_disposed", record)


def test_a_failed_unit_rolls_back_alone(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = write_csv(
        tmp_path / "notes.csv",
        "ada@example.com,Ada,buy milk",
        "bob@example.com,Bob,fix the bike",
        "bob@example.com,Bob,",  # blank: Bob's whole import fails, his registration included
        "carol@example.com,Carol,call Ada",
        "ada@example.com,Ada,call Bob",
    )
    assert job.main(["--database-url", database_url, "import-notes", notes]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "ada@example.com: imported 2 note(s)",
        "bob@example.com: failed (notes must not be blank), nothing of it was saved",
        "carol@example.com: imported 1 note(s)",
    ]
    assert stored(database_url) == {
        "ada@example.com": ["buy milk", "call Bob"],
        "carol@example.com": ["call Ada"],
    }


def test_a_second_import_adds_to_existing_users(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write_csv(tmp_path / "first.csv", "ada@example.com,Ada,buy milk")
    second = write_csv(tmp_path / "second.csv", "ada@example.com,Ada,call Bob", "bob@example.com,Bob,hi")
    assert job.main(["--database-url", database_url, "import-notes", first]) == 0
    assert job.main(["--database-url", database_url, "import-notes", second]) == 0
    assert stored(database_url) == {"ada@example.com": ["buy milk", "call Bob"], "bob@example.com": ["hi"]}

    capsys.readouterr()
    assert job.main(["--database-url", database_url, "list"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ada@example.com (Ada): buy milk, call Bob",
        "bob@example.com (Bob): hi",
    ]


def test_a_malformed_line_imports_nothing(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = write_csv(tmp_path / "notes.csv", "ada@example.com,Ada,buy milk", "bob@example.com,no note")
    assert job.main(["--database-url", database_url, "import-notes", notes]) == 2
    assert "line 2: expected email,name,note" in capsys.readouterr().err
    assert stored(database_url) == {}


def test_the_job_disposes_its_engine(
    tmp_path: Path, database_url: str, disposed_engines: list[Engine]
) -> None:
    notes = write_csv(tmp_path / "notes.csv", "ada@example.com,Ada,buy milk")
    assert job.main(["--database-url", database_url, "import-notes", notes]) == 0
    assert [str(engine.url) for engine in disposed_engines] == [database_url]


def test_the_app_serves_what_the_job_imported(tmp_path: Path, database_url: str) -> None:
    """The job and the app share the container, so they share the database and its tables."""
    notes = write_csv(tmp_path / "notes.csv", "ada@example.com,Ada,buy milk")
    assert job.main(["--database-url", database_url, "import-notes", notes]) == 0
    with TestClient(create_app(database_url)) as client:
        assert client.get("/users/1").json()["notes"] == ["buy milk"]
        assert client.post("/users/1/notes", json=["from the app"]).status_code == 201
    assert job.main(["--database-url", database_url, "list"]) == 0
    assert stored(database_url) == {"ada@example.com": ["buy milk", "from the app"]}
