"""Spring-style ``@transactional`` services on FastAPI: services that never call commit().

Run it: `python -m examples.transactional_services` (a throw-away SQLite file; prints every request).

The use case of the article "a @transactional decorator for FastAPI": a service
method decorated with ``@transactional`` runs inside its session's transaction,
and the session is the request's (``RequestScoped(unit_of_work, ...)``), injected
into ``self.session``. What the decorator does, request by request below:

* **Joining.** Inside a request, every ``@transactional`` method joins the
  request's transaction: two transfers in one request, each a withdrawal and a
  deposit, are one transaction, committed before the response or not at all.
* **Rollback-only.** If a joined method fails and the caller swallows the error,
  committing would save half an operation (a withdrawal without its deposit). The
  unit of work rolls everything back instead and raises ``RollbackOnlyError``, so
  the client gets a 500, never a 200 for a half-done transfer.
* **Savepoints.** ``@transactional(savepoint=True)`` runs a method in a SAVEPOINT:
  when it fails, only its own writes are undone, and the caller may go on.
* Outside any request (a script with a plain ``Session``), a ``@transactional``
  method begins and commits a transaction of its own.

SQLite needs SQLAlchemy's documented pysqlite recipe for SAVEPOINT (see
``database``); PostgreSQL needs nothing. No ``from __future__ import annotations``
here: dependency-injector's wiring reads the ``Annotated[..., Depends(Provide[...])]``
markers of the endpoints.
"""

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import String, create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from di_request_scope import RequestScoped, RequestScopeMiddleware, container_lifespan
from di_request_scope.sqlalchemy import transactional, unit_of_work


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    owner: Mapped[str] = mapped_column(String(50), primary_key=True)
    balance: Mapped[int]


class UnknownAccountError(Exception):
    pass


class InsufficientFundsError(Exception):
    pass


class Accounts:
    """Account rules. No commit() anywhere: @transactional and the request's outcome decide."""

    def __init__(self, session: Session) -> None:
        self.session = session  # @transactional finds the session here

    @transactional
    def open(self, owner: str, balance: int) -> None:
        self.session.add(Account(owner=owner, balance=balance))
        self.session.flush()

    @transactional
    def withdraw(self, owner: str, amount: int) -> None:
        account = self.get(owner)
        if account.balance < amount:
            raise InsufficientFundsError(f"{owner} has {account.balance}, cannot pay {amount}")
        account.balance -= amount
        self.session.flush()

    @transactional
    def deposit(self, owner: str, amount: int) -> None:
        self.get(owner).balance += amount
        self.session.flush()

    def get(self, owner: str) -> Account:
        account = self.session.get(Account, owner)
        if account is None:
            raise UnknownAccountError(f"no account {owner!r}")
        return account

    def balances(self) -> dict[str, int]:
        return {a.owner: a.balance for a in self.session.scalars(select(Account).order_by(Account.owner))}


class Payments:
    def __init__(self, session: Session, accounts: Accounts) -> None:
        self.session = session
        self.accounts = accounts

    @transactional
    def transfer(self, source: str, target: str, amount: int) -> None:
        """Withdraw, then deposit: both join this transaction, which joins the request's."""
        self.accounts.withdraw(source, amount)
        self.accounts.deposit(target, amount)  # if this fails, the withdrawal must not be saved

    @transactional(savepoint=True)
    def try_transfer(self, source: str, target: str, amount: int) -> None:
        """A transfer in a SAVEPOINT: when it fails, only its own writes are undone."""
        self.transfer(source, target, amount)

    @transactional
    def pay_out(self, source: str, amounts: dict[str, int]) -> list[str]:
        """Pay every target that can be paid; return the ones skipped."""
        skipped = []
        for target, amount in amounts.items():
            try:
                self.try_transfer(source, target, amount)
            except (UnknownAccountError, InsufficientFundsError):
                skipped.append(target)
        return skipped


def database(url: str) -> Iterator[Engine]:
    """The engine, as a container resource: tables created at startup, disposed at shutdown."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        # pysqlite's own transaction handling breaks SAVEPOINT; SQLAlchemy's documented recipe:
        # turn it off and let SQLAlchemy emit BEGIN itself.
        @event.listens_for(engine, "connect")
        def no_pysqlite_transactions(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

    Base.metadata.create_all(engine)
    try:
        yield engine
    finally:
        engine.dispose()


class Container(containers.DeclarativeContainer):
    wiring_config = containers.WiringConfiguration(modules=[__name__])

    config = providers.Configuration()
    engine = providers.Resource(database, config.database_url)
    # One Session per request: committed before a 2xx is sent, rolled back on failure.
    session = RequestScoped(unit_of_work, providers.Singleton(sessionmaker, bind=engine))
    accounts = providers.Factory(Accounts, session=session)
    payments = providers.Factory(Payments, session=session, accounts=accounts)


router = APIRouter()
AccountsDep = Annotated[Accounts, Depends(Provide[Container.accounts])]
PaymentsDep = Annotated[Payments, Depends(Provide[Container.payments])]


class Transfer(BaseModel):
    source: str
    target: str
    amount: int


@router.post("/accounts", status_code=201)
@inject
def open_accounts(balances: dict[str, int], accounts: AccountsDep) -> dict[str, int]:
    for owner, balance in balances.items():
        accounts.open(owner, balance)
    return accounts.balances()


@router.get("/accounts")
@inject
def read_balances(accounts: AccountsDep) -> dict[str, int]:
    return accounts.balances()


@router.post("/transfers")
@inject
def transfer(transfers: list[Transfer], payments: PaymentsDep) -> dict[str, int]:
    """Several transfers, one transaction: one that fails undoes them all."""
    try:
        for t in transfers:
            payments.transfer(t.source, t.target, t.amount)
    except (UnknownAccountError, InsufficientFundsError) as exc:
        raise HTTPException(409, str(exc)) from None  # the request fails: everything rolls back
    return payments.accounts.balances()


@router.post("/transfers/best-effort")
@inject
def transfer_best_effort(transfers: list[Transfer], payments: PaymentsDep) -> dict[str, list[str]]:
    """The mistake rollback-only guards against: going on after a joined method failed.

    A transfer to an unknown account fails after its withdrawal; skipping it without a
    savepoint leaves that withdrawal in the transaction. POST /payouts does it right.
    """
    skipped = []
    for t in transfers:
        try:
            payments.transfer(t.source, t.target, t.amount)
        except UnknownAccountError:
            skipped.append(t.target)
    return {"skipped": skipped}


@router.post("/payouts")
@inject
def pay_out(source: str, amounts: dict[str, int], payments: PaymentsDep) -> dict[str, list[str]]:
    """Each payment in a SAVEPOINT: the ones that fail are skipped, the others are kept."""
    return {"skipped": payments.pay_out(source, amounts)}


def create_app(database_url: str) -> FastAPI:
    container = Container()
    container.config.database_url.from_value(database_url)
    app = FastAPI(title="Payments", lifespan=container_lifespan(container))
    app.state.container = container
    app.add_middleware(RequestScopeMiddleware)
    app.include_router(router)
    return app


def main() -> int:
    """Drive the app through Starlette's TestClient and print what each request did."""
    from starlette.testclient import TestClient

    def call(method: str, url: str, body: Any, shown: str) -> None:
        response = client.request(method, url, json=body)
        print(f"   {method} {url} {shown} -> {response.status_code} {response.text}")

    def transfers(*moves: tuple[str, str, int]) -> tuple[list[dict[str, Any]], str]:
        body = [{"source": s, "target": t, "amount": a} for s, t, a in moves]
        return body, ", ".join(f"{s}->{t} {a}" for s, t, a in moves)

    def balances() -> dict[str, int]:
        found: dict[str, int] = client.get("/accounts").json()
        print(f"   balances: {found}")
        return found

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(f"sqlite:///{Path(tmp) / 'payments.sqlite3'}")
        with TestClient(app, raise_server_exceptions=False) as client:
            print("== Three accounts")
            call("POST", "/accounts", {"ada": 100, "bob": 0, "carol": 0}, "ada 100, bob 0, carol 0")

            print("\n== Joining: two transfers in one request are one transaction")
            call("POST", "/transfers", *transfers(("ada", "bob", 30), ("bob", "carol", 10)))
            call("POST", "/transfers", *transfers(("ada", "bob", 30), ("bob", "zoe", 10)))
            balances()
            print("   zoe has no account: the whole request was undone, ada->bob 30 with it")

            print("\n== Rollback-only: an endpoint skips a failed transfer and tries to answer 200")
            call("POST", "/transfers/best-effort", *transfers(("ada", "bob", 5), ("ada", "zoe", 5)))
            balances()
            print("   ada's withdrawal for zoe stayed in the transaction: RollbackOnlyError, 500, no change")

            print("\n== Savepoints: the same, done right: a failed payment is undone alone and skipped")
            call("POST", "/payouts?source=ada", {"bob": 5, "zoe": 5, "carol": 5}, "bob 5, zoe 5, carol 5")
            final = balances()

    expected = {"ada": 60, "bob": 25, "carol": 15}
    print("\nAll balances as expected." if final == expected else f"\nExpected {expected}!")
    return 0 if final == expected else 1


if __name__ == "__main__":
    sys.exit(main())
