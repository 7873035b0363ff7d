"""The reliability suite's app: a marker service whose every request writes and reads back its own row.

A repository and a service (``providers.Factory``) share the request's one
``RequestScoped(unit_of_work, ...)`` session with the endpoint and its
dependency; every response says which session (``Session.hash_key``, unique per
session) each of them got and which rows that session's transaction sees as its
own. The sessions record their own life in a :class:`Ledger` (created, committed,
rolled back, closed), so a test can prove every session was committed or rolled
back once and closed, whatever the clients saw.

``/async`` hands the blocking SQLAlchemy calls to the threadpool, as an async
endpoint serving concurrent requests must with a sync ``Session``: the session is
created on the event loop (an async dependency), used in a worker thread and
committed in another. ``/sync`` runs in the threadpool throughout. ``/inline``,
for the in-process soak's one request at a time, queries on the event loop.
"""

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Annotated, Any

from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import String, event, make_url, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from starlette.concurrency import run_in_threadpool

from di_request_scope import RequestScoped, RequestScopeMiddleware, container_lifespan
from di_request_scope import fastapi as di_fastapi
from di_request_scope.sqlalchemy import managed_engine, unit_of_work


class Base(DeclarativeBase):
    pass


class Marker(Base):
    """One row per request; no unique constraint, so a marker written twice would show up twice."""

    __tablename__ = "reliability_markers"

    id: Mapped[int] = mapped_column(primary_key=True)
    marker: Mapped[str] = mapped_column(String(64))
    session_key: Mapped[int]


class Ledger:
    """What happened to every session, by ``hash_key``; appends are atomic, so threads may share it."""

    def __init__(self) -> None:
        self.created: list[int] = []
        self.committed: list[int] = []
        self.rolled_back: list[int] = []
        self.closed: list[int] = []
        self._changed = threading.Condition()

    def note_closed(self, key: int) -> None:
        with self._changed:
            self.closed.append(key)
            self._changed.notify_all()

    def wait_closed(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` sessions were closed: teardown runs after the client got its response."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.closed) >= count, timeout)

    def watch(self, factory: sessionmaker[Session]) -> None:
        event.listen(factory, "after_commit", lambda session: self.committed.append(session.hash_key))
        event.listen(factory, "after_rollback", lambda session: self.rolled_back.append(session.hash_key))


class LedgerSession(Session):
    """A ``Session`` that records its creation and its ``close()`` in a ledger."""

    def __init__(self, *args: Any, ledger: Ledger, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = ledger
        ledger.created.append(self.hash_key)

    def close(self) -> None:
        super().close()
        self.ledger.note_closed(self.hash_key)


def ledger_sessionmaker(engine: Engine, ledger: Ledger) -> sessionmaker[Session]:
    factory = sessionmaker(bind=engine, class_=LedgerSession, ledger=ledger)
    ledger.watch(factory)
    return factory


def database(url: str, pool_size: int) -> Iterator[Engine]:
    """``managed_engine`` with a pool of ``pool_size`` and no disk flush per commit.

    The figures should measure the request path, not this machine's disk: SQLite
    runs in WAL mode with ``synchronous=NORMAL`` (SQLite's advice for WAL), and
    PostgreSQL sessions with ``synchronous_commit=off``. Both still commit for
    real; only the wait for the flush is gone. A SQLite writer that finds the
    file locked waits (``timeout``) instead of failing at once.
    """
    options: dict[str, Any] = {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": 30}
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        options["connect_args"] = {"timeout": 30}
    else:
        server_options = " ".join(filter(None, [parsed.query.get("options"), "-csynchronous_commit=off"]))
        url = parsed.update_query_dict({"options": server_options}).render_as_string(hide_password=False)
    with contextlib.closing(managed_engine(url, **options)) as engines:  # closing disposes it
        engine = next(engines)
        if is_sqlite:
            event.listen(engine, "connect", _sqlite_pragmas)
        yield engine


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the one writer
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_schema(engine: Engine) -> Iterator[None]:
    Base.metadata.create_all(engine)
    yield


# --8<-- [start:services]
class MarkerRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, marker: str) -> None:
        self.session.add(Marker(marker=marker, session_key=self.session.hash_key))
        self.session.flush()

    def mine(self) -> list[str]:
        """The markers this session wrote: only its own request's, if sessions are never shared."""
        query = select(Marker.marker).where(Marker.session_key == self.session.hash_key)
        return list(self.session.scalars(query))


class MarkerService:
    def __init__(self, repository: MarkerRepository, session: Session) -> None:
        self.repository = repository
        self.session = session

    def record(self, marker: str) -> dict[str, Any]:
        self.repository.add(marker)
        return {
            "read_back": self.repository.mine(),
            "service": self.session.hash_key,
            "service_repository": self.repository.session.hash_key,
        }


# --8<-- [end:services]


# --8<-- [start:container]
class Container(containers.DeclarativeContainer):
    config = providers.Configuration()
    ledger = providers.Singleton(Ledger)
    engine = providers.Resource(database, config.url, config.pool_size.as_int())
    schema = providers.Resource(create_schema, engine)
    session_factory = providers.Singleton(ledger_sessionmaker, engine, ledger)
    session = RequestScoped(unit_of_work, session_factory)
    repository = providers.Factory(MarkerRepository, session=session)
    service = providers.Factory(MarkerService, repository=repository, session=session)
    # --8<-- [end:container]


# Endpoints and the async dependency use di_request_scope's markers (awaited on the
# event loop); the sync dependency uses dependency-injector's own, which FastAPI
# calls in the threadpool: the session may first be created in a worker thread.
ThreadedSession = Annotated[Session, Depends(Provide[Container.session])]
ScopedSession = Annotated[Session, Depends(di_fastapi.Provide[Container.session])]
ScopedService = Annotated[MarkerService, Depends(di_fastapi.Provide[Container.service])]
ScopedRepository = Annotated[MarkerRepository, Depends(di_fastapi.Provide[Container.repository])]


@inject
def stamp_sync(marker: str, session: ThreadedSession) -> int:
    """The first injection point: stamps the request's marker on its session (first stamp wins)."""
    session.info.setdefault("marker", marker)
    return session.hash_key


@inject
async def stamp_async(marker: str, session: ScopedSession) -> int:
    session.info.setdefault("marker", marker)
    return session.hash_key


def answer(
    marker: str, stamped: int, session: Session, repository: MarkerRepository, recorded: dict[str, Any]
) -> JSONResponse:
    # A Response, not a dict: FastAPI would validate a sync endpoint's dict in
    # the threadpool, a thread hop taken while this request holds its write lock.
    return JSONResponse(
        {
            "marker": marker,
            "owner": session.info.get("marker"),
            "read_back": recorded["read_back"],
            "keys": [
                stamped,
                session.hash_key,
                repository.session.hash_key,
                recorded["service"],
                recorded["service_repository"],
            ],
        }
    )


# --8<-- [start:endpoints]
@inject
def record_sync(
    marker: str,
    stamped: Annotated[int, Depends(stamp_sync)],  # first: creates the session
    session: ScopedSession,
    repository: ScopedRepository,
    service: ScopedService,
) -> JSONResponse:
    return answer(marker, stamped, session, repository, service.record(marker))


@inject
async def record_async(
    marker: str,
    stamped: Annotated[int, Depends(stamp_async)],  # first: creates the session
    session: ScopedSession,
    repository: ScopedRepository,
    service: ScopedService,
) -> JSONResponse:
    return answer(marker, stamped, session, repository, await run_in_threadpool(service.record, marker))
    # --8<-- [end:endpoints]


@inject
async def record_inline(
    marker: str,
    stamped: Annotated[int, Depends(stamp_async)],
    session: ScopedSession,
    repository: ScopedRepository,
    service: ScopedService,
) -> JSONResponse:
    """The in-process soak's endpoint: no thread hop, its queries block the loop (one request at a time)."""
    return answer(marker, stamped, session, repository, service.record(marker))


class InFlight:
    """Outermost ASGI wrapper: counts requests in flight; holds the first ``gate`` until that many arrived.

    The gate proves the load really reached its concurrency: the first ``gate``
    requests are all inside the app at the same moment before any proceeds.
    """

    def __init__(self, app: Any, gate: int) -> None:
        self.app = app
        self.gate = gate
        self.arrived = self.now = self.peak = 0
        self.opened: asyncio.Event | None = None  # made on the server's event loop

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.opened is None:
            self.opened = asyncio.Event()
        self.arrived += 1
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            if self.arrived <= self.gate:
                if self.arrived == self.gate:
                    self.opened.set()
                await asyncio.wait_for(self.opened.wait(), timeout=60)  # a bound, not a delay
            await self.app(scope, receive, send)
        finally:
            self.now -= 1


def create_app(container: Container, *, gate: int = 0) -> InFlight:
    """The app for one container; wire the container into this module before serving it."""
    app = FastAPI(lifespan=container_lifespan(container))
    app.add_middleware(RequestScopeMiddleware)
    app.add_api_route("/sync/{marker}", record_sync, methods=["POST"])
    app.add_api_route("/async/{marker}", record_async, methods=["POST"])
    app.add_api_route("/inline/{marker}", record_inline, methods=["POST"])
    return InFlight(app, gate)
