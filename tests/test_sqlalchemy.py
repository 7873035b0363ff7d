"""Unit of work per request on real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from dependency_injector import containers, providers
from fastapi import BackgroundTasks, FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, registry, sessionmaker
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

from di_request_scope import (
    RequestScoped,
    RequestScopeMiddleware,
    container_lifespan,
    current_scope,
    request_scope,
)
from di_request_scope.sqlalchemy import (
    _BEGAN_IN,
    _UNIT_OF_WORK,
    LateCommitError,
    RollbackOnlyError,
    _note_begin_thread,
    managed_async_engine,
    managed_engine,
    transactional,
    unit_of_work,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Db:
    """A notes table on one backend, plus a way to read it from outside the app."""

    url: str
    async_url: str
    table: Table
    model: type[Any]
    is_postgres: bool

    def texts(self) -> list[str]:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return sorted(conn.execute(select(self.table.c.text)).scalars())
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Any, unique_name: str) -> Iterator[Db]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'notes.sqlite3'}"
        async_url = url.replace("sqlite://", "sqlite+aiosqlite://")
    else:
        url = request.getfixturevalue("postgres_url")
        async_url = url  # psycopg 3 serves both sync and async engines
    metadata = MetaData()
    # Deferred on PostgreSQL, so a duplicate fails at COMMIT itself; SQLite has no
    # deferrable UNIQUE, and there the duplicate fails in the flush that commit() runs.
    unique = (
        UniqueConstraint("text", deferrable=True, initially="DEFERRED")
        if request.param == "postgres"
        else UniqueConstraint("text")
    )
    table = Table(
        unique_name,
        metadata,
        Column("id", Integer, primary_key=True),
        Column("text", String(50), nullable=False),
        unique,
    )

    class Note:
        def __init__(self, text: str) -> None:
            self.text = text

    registry().map_imperatively(Note, table)
    engine = create_engine(url, poolclass=NullPool)
    metadata.create_all(engine)
    try:
        yield Db(url, async_url, table, Note, request.param == "postgres")
    finally:
        metadata.drop_all(engine)
        engine.dispose()


def build_sync_app(db: Db) -> tuple[FastAPI, Any]:
    """The documented sync set-up: engine in the container, created in the lifespan."""

    class Container(containers.DeclarativeContainer):
        engine = providers.Resource(managed_engine, db.url)
        session_factory = providers.Singleton(sessionmaker, bind=engine)
        session = RequestScoped(unit_of_work, session_factory)

    container = Container()
    app = FastAPI(lifespan=container_lifespan(container))
    app.add_middleware(RequestScopeMiddleware)
    Note = db.model

    @app.post("/notes", status_code=201)
    def create(text: list[str]) -> dict[str, Any]:
        container.session().add_all([Note(t) for t in text])
        return {"created": text}

    @app.post("/notes/http-error")
    def http_error(text: str) -> None:
        container.session().add(Note(text))
        raise HTTPException(status_code=409, detail="conflict")

    @app.post("/notes/crash")
    def crash(text: str) -> None:
        container.session().add(Note(text))
        raise RuntimeError("boom")

    @app.post("/notes/error-status")
    def error_status(text: str) -> JSONResponse:
        container.session().add(Note(text))
        return JSONResponse({"error": "invalid"}, status_code=422)

    @app.post("/notes/stream")
    def stream(text: str, late: str) -> StreamingResponse:
        container.session().add(Note(text))

        def body() -> Iterator[bytes]:
            yield b"first;"
            container.session().add(Note(late))
            yield b"second"

        return StreamingResponse(body())

    @app.post("/notes/background", status_code=202)
    def background(text: str, late: str, tasks: BackgroundTasks) -> dict[str, str]:
        container.session().add(Note(text))
        tasks.add_task(lambda: container.session().add(Note(late)))
        return {"queued": late}

    @app.post("/notes/background-only", status_code=202)
    def background_only(late: str, tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(lambda: container.session().add(Note(late)))
        return {"queued": late}

    @app.get("/notes/count")
    def count() -> dict[str, int]:
        return {"count": len(container.session().execute(select(db.table.c.id)).all())}

    return app, container


def build_async_app(db: Db) -> tuple[FastAPI, Any]:
    """The same app on AsyncSession."""

    class Container(containers.DeclarativeContainer):
        engine = providers.Resource(managed_async_engine, db.async_url)
        session_factory = providers.Singleton(async_sessionmaker, bind=engine)
        session = RequestScoped(unit_of_work, session_factory)

    container = Container()
    app = FastAPI(lifespan=container_lifespan(container))
    app.add_middleware(RequestScopeMiddleware)
    Note = db.model

    async def session() -> AsyncSession:
        return await container.session()  # type: ignore[no-any-return]

    @app.post("/notes", status_code=201)
    async def create(text: list[str]) -> dict[str, Any]:
        (await session()).add_all([Note(t) for t in text])
        return {"created": text}

    @app.post("/notes/http-error")
    async def http_error(text: str) -> None:
        (await session()).add(Note(text))
        raise HTTPException(status_code=409, detail="conflict")

    @app.post("/notes/crash")
    async def crash(text: str) -> None:
        (await session()).add(Note(text))
        raise RuntimeError("boom")

    @app.post("/notes/error-status")
    async def error_status(text: str) -> JSONResponse:
        (await session()).add(Note(text))
        return JSONResponse({"error": "invalid"}, status_code=422)

    @app.post("/notes/stream")
    async def stream(text: str, late: str) -> StreamingResponse:
        (await session()).add(Note(text))

        async def body() -> AsyncIterator[bytes]:
            yield b"first;"
            (await session()).add(Note(late))
            yield b"second"

        return StreamingResponse(body())

    @app.post("/notes/background", status_code=202)
    async def background(text: str, late: str, tasks: BackgroundTasks) -> dict[str, str]:
        (await session()).add(Note(text))

        async def write_late() -> None:
            (await session()).add(Note(late))

        tasks.add_task(write_late)
        return {"queued": late}

    @app.post("/notes/background-only", status_code=202)
    async def background_only(late: str, tasks: BackgroundTasks) -> dict[str, str]:
        async def write_late() -> None:
            (await session()).add(Note(late))

        tasks.add_task(write_late)
        return {"queued": late}

    @app.get("/notes/count")
    async def count() -> dict[str, int]:
        return {"count": len((await (await session()).execute(select(db.table.c.id))).all())}

    return app, container


def running_engine(client: TestClient, container: Any) -> Engine:
    """The app's engine; an async Resource must be awaited on the app's own loop."""
    if not container.engine.is_async_mode_enabled():
        return container.engine()  # type: ignore[no-any-return]

    async def resolve() -> Any:
        return await container.engine()

    return client.portal.call(resolve)  # type: ignore[union-attr,no-any-return]


@pytest.fixture(params=["sync", "async"])
def app_and_container(request: pytest.FixtureRequest, db: Db) -> tuple[FastAPI, Any]:
    return build_sync_app(db) if request.param == "sync" else build_async_app(db)


@pytest.fixture
def client(app_and_container: tuple[FastAPI, Any]) -> Iterator[TestClient]:
    app, _ = app_and_container
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_successful_request_commits(db: Db, client: TestClient) -> None:
    """A 2xx request's writes are committed and visible to another connection."""
    response = client.post("/notes", json=["a", "b"])
    assert response.status_code == 201
    assert db.texts() == ["a", "b"]


@pytest.mark.parametrize(
    ("path", "status"),
    [("/notes/http-error", 409), ("/notes/crash", 500), ("/notes/error-status", 422)],
)
def test_failed_request_rolls_back(db: Db, client: TestClient, path: str, status: int) -> None:
    """HTTPException, an unhandled exception and a returned error status all roll back."""
    response = client.post(path, params={"text": "lost"})
    assert response.status_code == status
    assert db.texts() == []


def test_failed_commit_answers_500_and_saves_nothing(db: Db, client: TestClient) -> None:
    """A commit that fails is reported to the client as a 5xx, never a 2xx, and nothing is saved."""
    assert client.post("/notes", json=["dup"]).status_code == 201
    response = client.post("/notes", json=["other", "dup"])
    assert response.status_code == 500
    assert db.texts() == ["dup"]


def test_streaming_body_writes_are_committed_after_the_status(db: Db, client: TestClient) -> None:
    """Writes made in a streaming body are committed at teardown, after the early commit."""
    response = client.post("/notes/stream", params={"text": "early", "late": "late"})
    assert response.status_code == 200
    assert response.text == "first;second"
    assert db.texts() == ["early", "late"]


def test_background_task_writes_are_committed(db: Db, client: TestClient) -> None:
    """Writes made in a background task share the request's session and are committed."""
    response = client.post("/notes/background", params={"text": "early", "late": "late"})
    assert response.status_code == 202
    assert db.texts() == ["early", "late"]


def test_session_first_used_in_a_background_task_is_committed_at_teardown(db: Db, client: TestClient) -> None:
    """A session created after the status was sent registers no hook and is committed at teardown."""
    response = client.post("/notes/background-only", params={"late": "late"})
    assert response.status_code == 202
    assert db.texts() == ["late"]


def test_many_concurrent_requests_leave_no_connection_checked_out(
    db: Db, app_and_container: tuple[FastAPI, Any]
) -> None:
    """After a burst of concurrent reads and writes every pooled connection is back: checkedout() == 0."""
    from concurrent.futures import ThreadPoolExecutor

    app, container = app_and_container
    with TestClient(app) as client:

        def one(i: int) -> int:
            if i % 2:
                return client.post("/notes", json=[f"n{i}"]).status_code
            return client.get("/notes/count").status_code

        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses = list(pool.map(one, range(200)))
        engine = running_engine(client, container)
        assert engine.pool.checkedout() == 0
    assert sorted(set(statuses)) == [200, 201]
    assert len(db.texts()) == 100


def test_failed_late_commit_is_logged_loudly(
    db: Db, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit after the status was sent that fails is logged as LateCommitError, never silently."""
    assert client.post("/notes", json=["dup"]).status_code == 201
    with caplog.at_level(logging.ERROR, logger="di_request_scope"):
        response = client.post("/notes/stream", params={"text": "early", "late": "dup"})
    assert response.status_code == 200  # the status was gone before the write was made
    assert db.texts() == ["dup", "early"]  # the early commit stands, the late write is reported
    late = [r for r in caplog.records if isinstance(r.exc_info and r.exc_info[1], LateCommitError)]
    assert len(late) == 1
    assert "NOT saved" in str(late[0].exc_info[1])  # type: ignore[index]
    assert isinstance(late[0].exc_info[1].__cause__, IntegrityError)  # type: ignore[index]


def test_lifespan_disposes_the_engine_and_leaves_no_connection(
    db: Db, app_and_container: tuple[FastAPI, Any]
) -> None:
    """The engine is created at startup and disposed at shutdown; no connection stays checked out."""
    app, container = app_and_container
    with TestClient(app) as client:
        for i in range(5):
            assert client.post("/notes", json=[f"n{i}"]).status_code == 201
        engine = running_engine(client, container)
        pool = engine.pool
        assert pool.checkedout() == 0
    # After shutdown the pool was disposed: a fresh pool object with nothing checked in.
    assert engine.pool is not pool
    assert engine.pool.checkedin() == 0


def test_unit_of_work_in_a_job_commits_on_success_and_rolls_back_on_error(db: Db) -> None:
    """Under request_scope() the commit happens when the block exits cleanly; an exception rolls back."""
    engine = create_engine(db.url)
    SessionLocal = sessionmaker(bind=engine)

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, SessionLocal)

    container = Container()
    with request_scope():
        container.session().add(db.model("kept"))
    with pytest.raises(ValueError, match="job failed"), request_scope():
        container.session().add(db.model("dropped"))
        raise ValueError("job failed")
    engine.dispose()
    assert db.texts() == ["kept"]


def test_unit_of_work_rejects_a_factory_that_makes_no_session() -> None:
    """unit_of_work with something other than a sessionmaker says what it needs."""

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, dict)

    with request_scope(), pytest.raises(TypeError, match="needs a factory of Session or AsyncSession"):
        Container().session()


class NoteService:
    """A service in the seed article's style: it never commits itself."""

    def __init__(self, session: Session, model: type[Any]) -> None:
        self.session = session
        self.model = model

    @transactional
    def add(self, text: str, *, fail: bool = False) -> None:
        self.session.add(self.model(text))
        self.session.flush()
        if fail:
            raise ValueError(f"cannot add {text}")

    @transactional(savepoint=True)
    def try_add(self, text: str, *, fail: bool = False) -> None:
        self.add(text, fail=fail)


def test_transactional_begins_and_commits_on_a_plain_session(db: Db) -> None:
    """Outside a unit of work, transactional begins its own transaction and commits it."""
    engine = create_engine(db.url)
    with Session(engine) as session:
        service = NoteService(session, db.model)
        service.add("one")
        assert not session.in_transaction()
        with pytest.raises(ValueError, match="cannot add two"):
            service.add("two", fail=True)
    engine.dispose()
    assert db.texts() == ["one"]


def test_transactional_joins_the_request_transaction(db: Db) -> None:
    """Inside a unit of work, transactional joins: nothing commits until the scope ends."""
    engine = create_engine(db.url)

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, providers.Object(sessionmaker(bind=engine)))
        service = providers.Factory(NoteService, session=session, model=providers.Object(db.model))

    container = Container()
    with pytest.raises(RuntimeError, match="request failed"), request_scope():
        container.service().add("a")
        container.service().add("b")
        assert db.texts() == []  # joined: not committed by the method
        raise RuntimeError("request failed")
    assert db.texts() == []
    with request_scope():
        container.service().add("a")
    engine.dispose()
    assert db.texts() == ["a"]


def test_swallowed_transactional_failure_makes_the_transaction_rollback_only(db: Db) -> None:
    """A joined method that failed, with the error swallowed, rolls everything back with a clear error."""
    engine = create_engine(db.url)

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, providers.Object(sessionmaker(bind=engine)))
        service = providers.Factory(NoteService, session=session, model=providers.Object(db.model))

    container = Container()
    with pytest.raises(RollbackOnlyError, match=r"NoteService\.add failed") as info, request_scope():
        container.service().add("first")
        try:
            container.service().add("half", fail=True)
        except ValueError:
            pass
    assert "savepoint=True" in str(info.value)
    engine.dispose()
    assert db.texts() == []


def test_transactional_savepoint_undoes_only_its_own_writes(db: Db) -> None:
    """savepoint=True rolls back just the failed call; the request's other writes commit."""
    engine = create_engine(db.url)
    if not db.is_postgres:
        _enable_sqlite_savepoints(engine)

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, providers.Object(sessionmaker(bind=engine)))
        service = providers.Factory(NoteService, session=session, model=providers.Object(db.model))

    container = Container()
    with request_scope():
        container.service().add("kept")
        with pytest.raises(ValueError, match="cannot add undone"):
            container.service().try_add("undone", fail=True)
        container.service().try_add("also kept")
    engine.dispose()
    assert db.texts() == ["also kept", "kept"]


def test_transactional_without_a_session_attribute_says_how_to_fix_it() -> None:
    """A method whose object has no session attribute gets a clear TypeError."""

    class Service:
        @transactional
        def run(self) -> None:
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match=r"self\.session.*Service has no such attribute"):
        Service().run()


@pytest.mark.anyio
async def test_async_transactional_finds_the_session_through_the_provider(db: Db) -> None:
    """transactional(session=provider) resolves the request's AsyncSession itself."""

    class Container(containers.DeclarativeContainer):
        engine = providers.Resource(managed_async_engine, db.async_url)
        session = RequestScoped(unit_of_work, providers.Singleton(async_sessionmaker, bind=engine))

    container = Container()
    await container.init_resources()  # type: ignore[misc]

    @transactional(session=container.session)
    async def add(text: str) -> None:
        (await container.session()).add(db.model(text))

    try:
        async with request_scope():
            await add("x")
            await add("y")
    finally:
        await container.shutdown_resources()  # type: ignore[misc]
    assert db.texts() == ["x", "y"]


def _enable_sqlite_savepoints(engine: Engine) -> None:
    """pysqlite's own transaction handling breaks SAVEPOINT; SQLAlchemy's documented recipe."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


def test_two_databases_in_one_request_each_follow_the_outcome(tmp_path: Any, postgres_url: str) -> None:
    """Two engines, two request-scoped sessions: both commit on success, both roll back on failure."""
    pieces = []
    for url in (f"sqlite:///{tmp_path / 'a.sqlite3'}", postgres_url):
        metadata = MetaData()
        table = Table(
            f"two_db_{abs(hash((url, id(metadata)))) % 10**8}",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("text", String(50)),
        )
        engine = create_engine(url)
        metadata.create_all(engine)
        pieces.append((engine, metadata, table))

    (engine_a, meta_a, table_a), (engine_b, meta_b, table_b) = pieces

    class Container(containers.DeclarativeContainer):
        users_db = RequestScoped(unit_of_work, providers.Object(sessionmaker(bind=engine_a)))
        audit_db = RequestScoped(unit_of_work, providers.Object(sessionmaker(bind=engine_b)))

    container = Container()
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/write")
    def write(text: str, fail: bool = False) -> dict[str, str]:
        users, audit = container.users_db(), container.audit_db()
        assert users is not audit
        users.execute(table_a.insert().values(text=text))
        audit.execute(table_b.insert().values(text=text))
        if fail:
            raise HTTPException(400)
        return {"written": text}

    try:
        with TestClient(app) as client:
            assert client.post("/write", params={"text": "ok"}).status_code == 200
            assert client.post("/write", params={"text": "bad", "fail": True}).status_code == 400
        for engine, table in ((engine_a, table_a), (engine_b, table_b)):
            with engine.connect() as conn:
                assert list(conn.execute(select(table.c.text)).scalars()) == ["ok"]
            assert engine.pool.checkedout() == 0
    finally:
        meta_a.drop_all(engine_a)
        meta_b.drop_all(engine_b)
        engine_a.dispose()
        engine_b.dispose()


@pytest.mark.postgres
def test_seed_deadlock_disappears_with_one_session_per_request(postgres_url: str, unique_name: str) -> None:
    """Two repositories updating one row: per-injection sessions block on the lock; RequestScoped does not."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    engine = create_engine(postgres_url, connect_args={"options": "-c lock_timeout=2000"})
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {unique_name} (id int primary key, n int)")
        conn.exec_driver_sql(f"INSERT INTO {unique_name} VALUES (1, 0)")
    SessionLocal = sessionmaker(bind=engine)

    class Repo:
        def __init__(self, session: Session) -> None:
            self.session = session

        def bump(self) -> None:
            self.session.execute(text(f"UPDATE {unique_name} SET n = n + 1 WHERE id = 1"))

    class PerInjection(containers.DeclarativeContainer):
        session = providers.Factory(SessionLocal)
        repo = providers.Factory(Repo, session=session)

    class PerRequest(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, providers.Object(SessionLocal))
        repo = providers.Factory(Repo, session=session)

    try:
        per_injection = PerInjection()
        first, second = per_injection.repo(), per_injection.repo()
        first.bump()
        with pytest.raises(OperationalError, match="lock timeout"):
            second.bump()  # the seed's deadlock: the second session waits on the first one's row lock
        first.session.rollback()
        second.session.rollback()
        first.session.close()
        second.session.close()

        per_request = PerRequest()
        with request_scope():
            per_request.repo().bump()
            per_request.repo().bump()
        with engine.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT n FROM {unique_name}").scalar() == 2
        assert engine.pool.checkedout() == 0
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {unique_name}")
        engine.dispose()


@pytest.mark.postgres
def test_rollback_is_invisible_to_another_connection(postgres_url: str, unique_name: str) -> None:
    """Uncommitted writes of a failing request are never visible outside it, before or after rollback."""
    from sqlalchemy import text

    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {unique_name} (v text)")
    SessionLocal = sessionmaker(bind=engine)

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, providers.Object(SessionLocal))

    container = Container()
    observer = create_engine(postgres_url, poolclass=NullPool)

    def visible() -> int:
        with observer.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT count(*) FROM {unique_name}").scalar_one())

    try:
        with pytest.raises(RuntimeError), request_scope():
            container.session().execute(text(f"INSERT INTO {unique_name} VALUES ('secret')"))
            assert visible() == 0
            raise RuntimeError("fail")
        assert visible() == 0
        assert engine.pool.checkedout() == 0
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {unique_name}")
        engine.dispose()
        observer.dispose()


@pytest.mark.postgres
def test_pool_exhaustion_gives_a_clear_error_not_a_hang(postgres_url: str) -> None:
    """When every pooled connection is held, a request fails fast with SQLAlchemy's pool timeout."""
    from sqlalchemy import text
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    engine = create_engine(postgres_url, pool_size=1, max_overflow=0, pool_timeout=0.5)
    SessionLocal = sessionmaker(bind=engine)

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, providers.Object(SessionLocal))

    container = Container()
    holder_ready, release = threading.Event(), threading.Event()

    @request_scope()
    def hold() -> None:
        container.session().execute(text("SELECT 1"))
        holder_ready.set()
        release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holder_ready.wait(30)
        with pytest.raises(PoolTimeout, match="QueuePool limit"), request_scope():
            container.session().execute(text("SELECT 1"))
    finally:
        release.set()
        holder.join(30)
    assert engine.pool.checkedout() == 0
    engine.dispose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("endpoint", "offload", "on_loop"),
    [
        ("async", None, True),
        ("sync", None, False),
        ("async", True, False),
        ("sync", False, True),
    ],
)
async def test_sync_session_io_runs_in_the_thread_where_its_transaction_began(
    tmp_path: Any, endpoint: str, offload: bool | None, on_loop: bool
) -> None:
    """Queries run on the loop keep commit and rollback there; queries in the threadpool send them there.

    ``offload=True`` / ``False`` pins them to a worker thread / the loop. Closing a session whose
    transaction already ended does no I/O and always runs on the loop.
    """
    import httpx

    events: list[tuple[str, int, bool]] = []

    class RecordingSession(Session):
        def commit(self) -> None:
            events.append(("commit", threading.get_ident(), self.in_transaction()))
            super().commit()

        def rollback(self) -> None:
            events.append(("rollback", threading.get_ident(), self.in_transaction()))
            super().rollback()

        def close(self) -> None:
            events.append(("close", threading.get_ident(), self.in_transaction()))
            super().close()

    engine = create_engine(f"sqlite:///{tmp_path / 'threads.sqlite3'}")

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(
            unit_of_work,
            providers.Object(sessionmaker(bind=engine, class_=RecordingSession)),
            offload=offload,
        )

    container = Container()
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)
    query_threads: list[int] = []
    loop_thread = threading.get_ident()

    def run_query(fail: bool) -> dict[str, int]:
        query_threads.append(threading.get_ident())
        value = container.session().execute(select(1)).scalar_one()
        if fail:
            raise HTTPException(409)
        return {"value": value}

    if endpoint == "async":

        @app.get("/query")
        async def async_query(fail: bool = False) -> dict[str, int]:
            return run_query(fail)

    else:

        @app.get("/query")
        def sync_query(fail: bool = False) -> dict[str, int]:
            return run_query(fail)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/query")).status_code == 200
        assert (await client.get("/query", params={"fail": True})).status_code == 409
    kinds = [kind for kind, _, _ in events]
    assert kinds == ["commit", "close", "rollback", "close"]
    (_, commit_thread, _), (_, ok_close_thread, ok_in_tx), (_, rollback_thread, rolled_back), _ = events
    assert (query_threads[0] == loop_thread) is (endpoint == "async")
    assert (commit_thread == loop_thread) is on_loop  # the commit ran where the queries ran
    assert rolled_back
    assert (rollback_thread == loop_thread) is on_loop  # and so did the failed request's rollback
    assert ok_close_thread == loop_thread  # committed before the response: closing does no I/O
    assert not ok_in_tx
    assert engine.pool.checkedout() == 0
    engine.dispose()


@pytest.mark.parametrize("audit_fails", [False, True], ids=["audit commits", "audit commit fails"])
def test_a_session_first_used_while_another_commits_commits_before_the_status(
    db: Db, tmp_path: Any, audit_fails: bool
) -> None:
    """An audit session written from the main session's ``before_commit`` (in a worker thread) is
    committed before the status as well: its failure is a 500, not a 200 with lost audit rows."""
    audit_metadata = MetaData()
    audit = Table(
        "audit",
        audit_metadata,
        Column("id", Integer, primary_key=True),
        Column("text", String(50), unique=True),
    )

    class AuditRow:
        def __init__(self, text: str) -> None:
            self.text = text

    registry().map_imperatively(AuditRow, audit)
    audit_engine = create_engine(f"sqlite:///{tmp_path / 'audit.sqlite3'}", poolclass=NullPool)
    audit_metadata.create_all(audit_engine)
    if audit_fails:
        with audit_engine.begin() as conn:
            conn.execute(audit.insert().values(text="wrote hello"))  # the audit insert will collide
    engine = create_engine(db.url, poolclass=NullPool)
    main_sessions = sessionmaker(bind=engine)
    audit_sessions = sessionmaker(bind=audit_engine)

    class Container(containers.DeclarativeContainer):
        # offload=True: the main commit, and so its before_commit event, runs in a worker thread
        # while the middleware awaits it.
        session = RequestScoped(unit_of_work, providers.Object(main_sessions), offload=True)
        audit_session = RequestScoped(unit_of_work, providers.Object(audit_sessions))

    container = Container()
    commits_before_the_status: list[bool] = []

    @event.listens_for(audit_sessions, "after_commit")
    def note_audit_commit(session: Session) -> None:
        commits_before_the_status.append(not current_scope().response_started)

    @event.listens_for(main_sessions, "before_commit")
    def write_audit(session: Session) -> None:
        container.audit_session().add(AuditRow("wrote hello"))  # flushed, and so failing, at its commit

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/notes")
    async def create_note() -> dict[str, str]:
        container.session().add(db.model("hello"))
        return {"created": "hello"}

    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            status = client.post("/notes").status_code
        with audit_engine.connect() as conn:
            audited = list(conn.execute(select(audit.c.text)).scalars())
    finally:
        audit_engine.dispose()
        engine.dispose()
    assert status == (500 if audit_fails else 200)
    assert audited == ["wrote hello"]
    assert commits_before_the_status == ([] if audit_fails else [True])


def test_unit_of_work_listens_only_to_its_own_sessionmakers_sessions(tmp_path: Any) -> None:
    """Its after-begin listener goes on the sessionmaker's own class: other sessions pay nothing for it."""
    engine = create_engine(f"sqlite:///{tmp_path / 'listen.sqlite3'}")
    used, other = sessionmaker(bind=engine), sessionmaker(bind=engine)
    session = RequestScoped(unit_of_work, used)
    with request_scope():
        resolved = session()
        resolved.execute(select(1))
        assert resolved.info[_BEGAN_IN] == threading.get_ident()
    assert event.contains(used.class_, "after_begin", _note_begin_thread)
    with other() as plain:  # even marked as a unit of work's, the other sessionmaker's session notes nothing
        plain.info[_UNIT_OF_WORK] = True
        plain.execute(select(1))
        assert _BEGAN_IN not in plain.info, event.contains(Session, "after_begin", _note_begin_thread)
    engine.dispose()


class AsyncNoteService:
    """The async twin of NoteService."""

    def __init__(self, session: AsyncSession, model: type[Any]) -> None:
        self.session = session
        self.model = model

    @transactional
    async def add(self, text: str, *, fail: bool = False) -> None:
        self.session.add(self.model(text))
        await self.session.flush()
        if fail:
            raise ValueError(f"cannot add {text}")

    @transactional(savepoint=True)
    async def try_add(self, text: str, *, fail: bool = False) -> None:
        await self.add(text, fail=fail)


@pytest.mark.anyio
async def test_async_transactional_joins_marks_rollback_only_and_uses_savepoints(db: Db) -> None:
    """AsyncSession: joined calls commit with the scope, a savepoint undoes a call, swallowing rolls back."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(db.async_url)
    if not db.is_postgres:
        _enable_sqlite_savepoints(engine.sync_engine)

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, providers.Object(async_sessionmaker(bind=engine)))
        service = providers.Factory(AsyncNoteService, session=session, model=providers.Object(db.model))

    container = Container()
    try:
        async with request_scope():
            await (await container.service()).add("kept")
            with pytest.raises(ValueError, match="cannot add undone"):
                await (await container.service()).try_add("undone", fail=True)
            await (await container.service()).try_add("also kept")
        assert db.texts() == ["also kept", "kept"]

        with pytest.raises(RollbackOnlyError):
            async with request_scope():
                await (await container.service()).add("half")
                with contextlib.suppress(ValueError):
                    await (await container.service()).add("failed", fail=True)
        assert db.texts() == ["also kept", "kept"]
    finally:
        await engine.dispose()


def test_transactional_savepoint_on_a_plain_session_commits_its_own_transaction(db: Db) -> None:
    """With no transaction to join, savepoint=True begins and commits one instead of a dangling SAVEPOINT."""
    engine = create_engine(db.url)
    with Session(engine) as session:
        service = NoteService(session, db.model)
        service.try_add("saved")
        assert not session.in_transaction()
    engine.dispose()
    assert db.texts() == ["saved"]


@pytest.mark.anyio
async def test_commits_never_wait_for_threads_held_by_requests_waiting_for_their_connection(
    db: Db,
) -> None:
    """More sync requests than worker threads, one pooled connection: every request still completes.

    Each request's commit needs a thread while it holds the only connection; the other requests hold
    the threads while they wait for it. Commits therefore do not queue behind them for anyio's
    default thread limiter, which sync endpoints share.
    """
    import anyio.to_thread
    import httpx

    engine = create_engine(db.url, pool_size=1, max_overflow=0, pool_timeout=10)

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, providers.Object(sessionmaker(bind=engine)))

    container = Container()
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/notes/{text}", status_code=201, response_model=None)
    def add(text: str):  # no return annotation: FastAPI would validate the response in a thread too
        session = container.session()
        session.add(db.model(text))
        session.flush()  # takes the pool's only connection until the commit
        return {"added": text}

    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens, limiter.total_tokens = limiter.total_tokens, 2
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            texts = [f"note {i}" for i in range(6)]
            async with anyio.create_task_group() as group:
                statuses: list[int] = []

                async def post(text: str) -> None:
                    statuses.append((await client.post(f"/notes/{text}")).status_code)

                for text in texts:
                    group.start_soon(post, text)
    finally:
        limiter.total_tokens = tokens
    assert statuses == [201] * len(texts)
    assert db.texts() == texts
    assert engine.pool.checkedout() == 0
    engine.dispose()


@pytest.mark.anyio
async def test_a_request_cancelled_during_its_commit_tears_down_only_after_the_commit(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The commit in a worker thread is shielded: teardown never touches the session while it runs."""
    import asyncio

    from sqlalchemy import event, text

    engine = create_engine(f"sqlite:///{tmp_path / 'cancel.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (text TEXT)"))
    committing, release = threading.Event(), threading.Event()
    steps: list[str] = []

    class RecordingSession(Session):
        def rollback(self) -> None:
            steps.append("rollback")
            super().rollback()

        def close(self) -> None:
            steps.append("close")
            super().close()

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(
            unit_of_work, providers.Object(sessionmaker(bind=engine, class_=RecordingSession))
        )

    container = Container()

    def hold_the_commit(session: Session) -> None:
        committing.set()
        release.wait(30)
        steps.append("committed")

    event.listen(RecordingSession, "before_commit", hold_the_commit)
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/notes")
    def add() -> dict[str, bool]:
        container.session().execute(text("INSERT INTO notes VALUES ('cancelled')"))
        return {"ok": True}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        steps.append(message["type"])

    scope = {"type": "http", "method": "POST", "path": "/notes", "headers": [], "query_string": b""}
    request = asyncio.ensure_future(app(scope, receive, send))
    try:
        await asyncio.to_thread(committing.wait, 30)  # the commit runs in a worker thread now
        request.cancel()
        for _ in range(3):  # thread round trips: time for a teardown that did not wait to start
            await asyncio.to_thread(lambda: None)
        assert not request.done()  # the request waits for its commit
    finally:
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await request
        event.remove(RecordingSession, "before_commit", hold_the_commit)
    # No response was sent; teardown (the failed request's rollback) came after the commit, not during it.
    assert steps == ["committed", "rollback", "close"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert engine.pool.checkedout() == 0
    engine.dispose()
