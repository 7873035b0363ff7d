"""The @transactional example: joining, rollback-only and savepoints, on SQLite and PostgreSQL.

Most tests run inside a transaction that di_request_scope's pytest plugin rolls
back after the test (`di_transaction`). The app's session provider is
`RequestScoped(unit_of_work, <a sessionmaker provider written inline>)`, so the
`client` fixture binds that RequestScoped itself. The app's own SAVEPOINTs
(`@transactional(savepoint=True)`) nest inside the test's transaction; balances
are read through the test's connection, which sees what the app committed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

from di_request_scope.sqlalchemy import RollbackOnlyError
from di_request_scope.testing import RolledBackTransaction
from examples import transactional_services
from examples.transactional_services import Account, Accounts, Base, create_app


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/payments.sqlite3"
    return str(request.getfixturevalue("postgres_schema_url"))


@pytest.fixture
def di_engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def client(database_url: str, di_transaction: RolledBackTransaction) -> Iterator[TestClient]:
    app = create_app(database_url)
    di_transaction.bind(app.state.container.session)  # RequestScoped(unit_of_work, ...): same initializer
    with TestClient(app) as client:
        response = client.post("/accounts", json={"ada": 100, "bob": 0, "carol": 0})
        assert response.status_code == 201
        yield client


def balances(connection: Connection) -> dict[str, int]:
    return dict(connection.execute(select(Account.owner, Account.balance)).all())


def committed(database_url: str) -> dict[str, int]:
    """The balances as another connection sees them."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return balances(conn)
    finally:
        engine.dispose()


def transfers(*moves: tuple[str, str, int]) -> list[dict[str, Any]]:
    return [{"source": s, "target": t, "amount": a} for s, t, a in moves]


def test_two_transfers_in_one_request_commit_together(
    client: TestClient, di_transaction: RolledBackTransaction
) -> None:
    response = client.post("/transfers", json=transfers(("ada", "bob", 30), ("bob", "carol", 10)))
    assert response.status_code == 200
    assert response.json() == {"ada": 70, "bob": 20, "carol": 10}
    assert balances(di_transaction.connection) == {"ada": 70, "bob": 20, "carol": 10}


def test_joined_methods_fail_together(client: TestClient, di_transaction: RolledBackTransaction) -> None:
    """The second transfer's deposit fails: its withdrawal and the whole first transfer are undone."""
    response = client.post("/transfers", json=transfers(("ada", "bob", 30), ("bob", "zoe", 10)))
    assert response.status_code == 409
    assert response.json() == {"detail": "no account 'zoe'"}
    assert balances(di_transaction.connection) == {"ada": 100, "bob": 0, "carol": 0}


def test_insufficient_funds_is_refused(client: TestClient, di_transaction: RolledBackTransaction) -> None:
    response = client.post("/transfers", json=transfers(("bob", "ada", 1)))
    assert response.status_code == 409
    assert response.json() == {"detail": "bob has 0, cannot pay 1"}
    assert balances(di_transaction.connection) == {"ada": 100, "bob": 0, "carol": 0}


def test_a_swallowed_failure_makes_the_request_roll_back(
    client: TestClient, di_transaction: RolledBackTransaction
) -> None:
    """Skipping a failed transfer without a savepoint would commit its withdrawal: rolled back instead."""
    with pytest.raises(RollbackOnlyError, match=r"Accounts\.deposit failed with UnknownAccountError"):
        client.post("/transfers/best-effort", json=transfers(("ada", "bob", 5), ("ada", "zoe", 5)))
    assert balances(di_transaction.connection) == {"ada": 100, "bob": 0, "carol": 0}


def test_a_swallowed_failure_answers_500(database_url: str) -> None:
    """Without the test transaction: the 500 and a rollback another connection sees."""
    with TestClient(create_app(database_url), raise_server_exceptions=False) as client:
        client.post("/accounts", json={"ada": 100, "bob": 0})
        response = client.post("/transfers/best-effort", json=transfers(("ada", "bob", 5), ("ada", "zoe", 5)))
    assert response.status_code == 500
    assert committed(database_url) == {"ada": 100, "bob": 0}


def test_a_savepoint_undoes_only_the_failed_payment(
    client: TestClient, di_transaction: RolledBackTransaction
) -> None:
    response = client.post("/payouts", params={"source": "ada"}, json={"bob": 5, "zoe": 5, "carol": 500})
    assert response.status_code == 200
    assert response.json() == {"skipped": ["zoe", "carol"]}  # unknown account, insufficient funds
    assert balances(di_transaction.connection) == {"ada": 95, "bob": 5, "carol": 0}


def test_outside_a_request_a_method_commits_its_own_transaction(database_url: str) -> None:
    """In a script with a plain Session, @transactional begins and commits by itself."""
    engine = create_engine(database_url)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            accounts = Accounts(session)
            accounts.open("dan", 10)
            assert not session.in_transaction()  # committed and ended by the decorator
            with pytest.raises(transactional_services.InsufficientFundsError):
                accounts.withdraw("dan", 11)
    finally:
        engine.dispose()
    assert committed(database_url) == {"dan": 10}


def test_main_tells_the_story(capsys: pytest.CaptureFixture[str]) -> None:
    assert transactional_services.main() == 0
    out = capsys.readouterr().out
    assert "POST /transfers ada->bob 30, bob->zoe 10 -> 409" in out
    assert "POST /transfers/best-effort ada->bob 5, ada->zoe 5 -> 500" in out
    assert 'POST /payouts?source=ada bob 5, zoe 5, carol 5 -> 200 {"skipped":["zoe"]}' in out
    assert "All balances as expected." in out
