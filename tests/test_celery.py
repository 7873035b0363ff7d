"""ScopedTask: one scope per Celery task execution, in a real worker on Redis and in eager mode.

The workers run in this process (``celery.contrib.testing.worker.start_worker``,
solo and threads pools) so that the tests can look at the very Session objects
the tasks used; the example's tests run a prefork worker as a subprocess. Each
worker app gets a key prefix and queue of its own on the shared Redis server, so
parallel runs never see each other's messages or results.
"""

from __future__ import annotations

import gc
import itertools
import os
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
from celery import Celery, signals
from celery.contrib.testing.worker import start_worker
from celery.result import AsyncResult, EagerResult
from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject
from fastapi import BackgroundTasks, FastAPI
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

from di_request_scope import (
    NoRequestScopeError,
    RequestScope,
    RequestScoped,
    RequestScopeMiddleware,
    current_scope,
    request_scope,
)
from di_request_scope._scope import _current
from di_request_scope.celery import ScopedTask
from di_request_scope.sqlalchemy import unit_of_work

REDIS_URL = os.environ.get("DI_REQUEST_SCOPE_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("DI_REQUEST_SCOPE_REQUIRE_REDIS") == "1"
RESULT_TIMEOUT = 30  # a bound on a hang, not a timing assertion

# Celery's Redis result backend calls redis-py's setex(), deprecated in redis-py 8;
# the worker runs in this process, so pytest's warnings-as-errors would fail it.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")


def _redis_problem() -> str | None:
    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3) as client:
            client.ping()
    except redis.RedisError as exc:
        return f"no Redis server at {REDIS_URL}: {exc}"
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A reachable Redis URL, or skip (fail when DI_REQUEST_SCOPE_REQUIRE_REDIS=1)."""
    problem = _redis_problem()
    if problem:
        if REQUIRE_REDIS:
            pytest.fail(f"Redis is required (DI_REQUEST_SCOPE_REQUIRE_REDIS=1) but {problem}")
        pytest.skip(f"worker-mode Celery tests need a broker: {problem}")
    return REDIS_URL


# --------------------------------------------------------------------------- what the tasks use


class RecordingSession(Session):
    """A real Session that notes what the unit of work did to it, for the test to read."""

    numbers = itertools.count(1)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.number = next(self.numbers)
        self.events: list[str] = []
        SESSIONS[self.number] = self

    def commit(self) -> None:
        try:
            super().commit()
        except Exception:
            self.events.append("commit failed")
            raise
        self.events.append("commit")

    def rollback(self) -> None:
        self.events.append("rollback")
        super().rollback()

    def close(self) -> None:
        super().close()
        self.events.append("close")


SESSIONS: dict[int, RecordingSession] = {}


class NoteRepository:
    def __init__(self, session: Session, table: Table) -> None:
        self.session = session
        self.table = table

    def add(self, text: str, parent_id: int | None = None) -> None:
        self.session.execute(insert(self.table).values(text=text, parent_id=parent_id))

    def has(self, text: str) -> bool:
        return self.session.scalar(select(self.table.c.id).where(self.table.c.text == text)) is not None


class NoteService:
    def __init__(self, notes: NoteRepository, session: Session) -> None:
        self.notes = notes
        self.session = session


class Container(containers.DeclarativeContainer):
    session_factory = providers.Dependency(instance_of=sessionmaker)
    table = providers.Dependency(instance_of=Table)
    session = RequestScoped(unit_of_work, session_factory)
    notes = providers.Factory(NoteRepository, session=session, table=table)
    service = providers.Factory(NoteService, notes=notes, session=session)


container = Container()


def seen(session: RecordingSession, service: NoteService) -> dict[str, Any]:
    """What a task reports about its injections: its session, and whether every injection shares it."""
    return {
        "session": session.number,
        "shared": service.session is session and service.notes.session is session,
        "thread": threading.get_ident(),
    }


@dataclass
class Tasks:
    """The tasks of one Celery app, and what their attempts saw (attempts that raise return nothing)."""

    app: Celery
    attempts: dict[str, list[int]] = field(default_factory=dict)
    barrier: threading.Barrier = field(default_factory=lambda: threading.Barrier(2, timeout=RESULT_TIMEOUT))

    def __post_init__(self) -> None:
        app, attempts = self.app, self.attempts

        @app.task(shared=False)
        @inject
        def add_note(
            text: str,
            fail: bool = False,
            session: RecordingSession = Provide[Container.session],
            service: NoteService = Provide[Container.service],
        ) -> dict[str, Any]:
            service.notes.add(text)
            attempts.setdefault(text, []).append(session.number)
            if fail:
                raise ValueError(f"{text} failed after its write")
            return seen(session, service)

        @app.task(shared=False)
        @inject
        def add_orphan(
            text: str,
            session: RecordingSession = Provide[Container.session],
            notes: NoteRepository = Provide[Container.notes],
        ) -> int:
            notes.add(text, parent_id=10**6)  # no such parent: the deferred foreign key fails at COMMIT
            attempts.setdefault(text, []).append(session.number)
            return session.number

        @app.task(shared=False, bind=True, max_retries=1)
        @inject
        def add_then_retry(
            self: Any, text: str, session: RecordingSession = Provide[Container.session]
        ) -> int:
            attempt = self.request.retries
            session.execute(insert(container.table()).values(text=f"{text}-attempt-{attempt}"))
            attempts.setdefault(text, []).append(session.number)
            if attempt == 0:
                raise self.retry(countdown=0)
            return session.number

        @app.task(
            shared=False, bind=True, autoretry_for=(IntegrityError,), max_retries=1, default_retry_delay=0
        )
        @inject
        def commit_fails_once(
            self: Any,
            text: str,
            session: RecordingSession = Provide[Container.session],
            notes: NoteRepository = Provide[Container.notes],
        ) -> int:
            attempt = self.request.retries
            notes.add(f"{text}-attempt-{attempt}", parent_id=10**6 if attempt == 0 else None)
            attempts.setdefault(text, []).append(session.number)
            return session.number

        @app.task(shared=False)
        @inject
        def meet(
            text: str,
            session: RecordingSession = Provide[Container.session],
            service: NoteService = Provide[Container.service],
        ) -> dict[str, Any]:
            # Both tasks hold their sessions at once, or this breaks. (Before writing:
            # SQLite has one writer at a time, and the other one would wait for it.)
            self.barrier.wait()
            service.notes.add(text)
            return seen(session, service)

        @app.task(shared=False)
        @inject
        def has_note(text: str, notes: NoteRepository = Provide[Container.notes]) -> bool:
            return notes.has(text)

        self.add_note = add_note
        self.has_note = has_note
        self.add_orphan = add_orphan
        self.add_then_retry = add_then_retry
        self.commit_fails_once = commit_fails_once
        self.meet = meet
        container.wire(modules=[__name__])


# --------------------------------------------------------------------------- databases


@dataclass
class Db:
    engine: Engine
    table: Table
    url: str

    def texts(self) -> list[str]:
        """What was committed, read through a connection of our own."""
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return sorted(conn.execute(select(self.table.c.text)).scalars())
        finally:
            engine.dispose()


def notes_table(name: str) -> tuple[MetaData, Table]:
    metadata = MetaData()
    table = Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True),
        Column("text", String(100), nullable=False),
        # Checked at COMMIT, on SQLite and PostgreSQL alike: a real commit that fails.
        Column("parent_id", ForeignKey(f"{name}.id", deferrable=True, initially="DEFERRED")),
    )
    return metadata, table


@pytest.fixture
def sqlite_db(tmp_path: Path, unique_name: str) -> Iterator[Db]:
    yield from use_database(f"sqlite:///{tmp_path / 'notes.sqlite3'}", unique_name)


@pytest.fixture
def sqlite_db_for_concurrent_writers(tmp_path: Path, unique_name: str) -> Iterator[Db]:
    yield from use_database(f"sqlite:///{tmp_path / 'notes.sqlite3'}", unique_name, concurrent_writers=True)


def use_database(url: str, name: str, *, concurrent_writers: bool = False) -> Iterator[Db]:
    """Create the table, point the container's session factory at it, drop it afterwards."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def foreign_keys_on(dbapi_connection: Any, _: Any) -> None:
            dbapi_connection.execute("PRAGMA foreign_keys = ON")
            if concurrent_writers:
                dbapi_connection.isolation_level = None  # we say BEGIN ourselves, below

        if concurrent_writers:

            @event.listens_for(engine, "begin")
            def begin_immediate(conn: Any) -> None:
                # With SQLite's default deferred BEGIN the second of two writers can
                # hit "database is locked" at once (deadlock avoidance) instead of
                # waiting for the first one's commit.
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    metadata, table = notes_table(name)
    metadata.create_all(engine)
    container.session_factory.override(providers.Object(sessionmaker(engine, class_=RecordingSession)))
    container.table.override(providers.Object(table))
    try:
        yield Db(engine, table, url)
    finally:
        container.session_factory.reset_override()
        container.table.reset_override()
        metadata.drop_all(engine)
        engine.dispose()


def checked_out(db: Db) -> int:
    return db.engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]


# --------------------------------------------------------------------------- workers


@dataclass
class ScopeProbe:
    """Whether a scope is set just before and just after each task execution, and in which thread."""

    app: Celery
    seen: list[tuple[str, str, int, bool]] = field(default_factory=list)

    def record(self, when: str, sender: Any = None, task_id: str = "", **_: Any) -> None:
        if getattr(sender, "app", None) is not self.app:
            return
        # Any scope at all, even a closed one left behind, is a leak into the next task.
        self.seen.append((when, task_id, threading.get_ident(), _current.get() is not None))

    def prerun(self, **kwargs: Any) -> None:
        self.record("prerun", **kwargs)

    def postrun(self, **kwargs: Any) -> None:
        self.record("postrun", **kwargs)


@dataclass
class Worker:
    tasks: Tasks
    probe: ScopeProbe


@contextmanager
def running_worker(redis_url: str, pool: str, concurrency: int = 1) -> Iterator[Worker]:
    """An in-process worker of a fresh app; its Redis keys are removed when it stops."""
    # Every key the app makes on the shared server starts with this prefix, so
    # parallel runs (and the two workers of this module) never share a queue.
    prefix = f"di-request-scope-test-{uuid.uuid4().hex[:12]}-{pool}:"
    app = Celery(f"test_celery_{pool}", task_cls=ScopedTask, broker=redis_url, backend=redis_url)
    app.conf.update(
        task_default_queue=f"{prefix}tasks",
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        broker_connection_retry_on_startup=True,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    tasks = Tasks(app)  # registered before the worker starts, so that it knows them
    probe = ScopeProbe(app)
    signals.task_prerun.connect(probe.prerun, weak=False)
    signals.task_postrun.connect(probe.postrun, weak=False)
    try:
        with start_worker(app, pool=pool, concurrency=concurrency, perform_ping_check=False):
            yield Worker(tasks, probe)
    finally:
        signals.task_prerun.disconnect(probe.prerun)
        signals.task_postrun.disconnect(probe.postrun)
        close_connections(app)
        with redis.Redis.from_url(redis_url) as client:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)


def close_connections(app: Celery) -> None:
    """Close the app's Redis connections now, not whenever the garbage collector gets to them.

    Celery's result consumer and kombu drop some connections without closing
    them (a pool reset, a worker thread's own backend). Collected later, each
    raises ResourceWarning, an error under pytest, in whatever test runs then;
    so close what we can reach and collect the rest here, where it is expected.
    """
    app.pool.force_close_all()
    backend = app.backend
    backend.result_consumer.stop()
    backend.client.connection_pool.disconnect()
    app.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


# Class-scoped: two in-process workers on the Redis transport must not run at the
# same time (they share kombu's global event loop), so each class stops its own.
@pytest.fixture(scope="class")
def solo(redis_url: str) -> Iterator[Worker]:
    with running_worker(redis_url, "solo") as worker:
        yield worker


@pytest.fixture(scope="class")
def threads(redis_url: str) -> Iterator[Worker]:
    with running_worker(redis_url, "threads", concurrency=2) as worker:
        yield worker


def wait(result: AsyncResult[Any]) -> Any:
    return result.get(timeout=RESULT_TIMEOUT, propagate=False)


# --------------------------------------------------------------------------- worker mode


@pytest.mark.server
class TestSoloWorker:
    """A solo worker: every task runs in the worker's one thread, one after the other."""

    def test_task_gets_one_session_shared_by_every_injection_and_commits(
        self, solo: Worker, sqlite_db: Db
    ) -> None:
        """Every injection in one execution gets one Session, committed and closed when the body returns."""
        result = solo.tasks.add_note.delay("ada")
        report = wait(result)
        assert result.state == "SUCCESS", result.traceback
        assert report["shared"] is True
        assert SESSIONS[report["session"]].events == ["commit", "close"]
        assert sqlite_db.texts() == ["ada"]
        assert checked_out(sqlite_db) == 0

    def test_task_that_raises_rolls_back_and_fails(self, solo: Worker, sqlite_db: Db) -> None:
        """An exception leaving the body rolls its writes back and the task fails with it."""
        result = solo.tasks.add_note.delay("bob", fail=True)
        error = wait(result)
        assert result.state == "FAILURE"
        assert isinstance(error, ValueError)
        [number] = solo.tasks.attempts["bob"]
        assert SESSIONS[number].events == ["rollback", "close"]
        assert sqlite_db.texts() == []
        assert checked_out(sqlite_db) == 0

    def test_task_whose_commit_fails_is_marked_failed_not_succeeded(
        self, solo: Worker, sqlite_db: Db
    ) -> None:
        """The commit runs before Celery records the outcome: a failed commit is a FAILURE with its error."""
        result = solo.tasks.add_orphan.delay("orphan")
        wait(result)
        assert result.state == "FAILURE"
        # The error travels as JSON, which cannot rebuild an IntegrityError; its traceback names it.
        assert "sqlalchemy.exc.IntegrityError" in result.traceback
        assert "FOREIGN KEY constraint failed" in result.traceback
        [number] = solo.tasks.attempts["orphan"]
        assert SESSIONS[number].events == ["commit failed", "rollback", "close"]
        assert sqlite_db.texts() == []

    def test_retry_rolls_back_the_attempt_and_the_next_attempt_has_its_own_session(
        self, solo: Worker, sqlite_db: Db
    ) -> None:
        """self.retry() is a failure for the attempt that raised it; the retry commits in a new session."""
        result = solo.tasks.add_then_retry.delay("carol")
        number = wait(result)
        assert result.state == "SUCCESS", result.traceback
        first, second = solo.tasks.attempts["carol"]
        assert second == number != first
        assert SESSIONS[first].events == ["rollback", "close"]
        assert SESSIONS[second].events == ["commit", "close"]
        assert sqlite_db.texts() == ["carol-attempt-1"]

    def test_autoretry_for_retries_a_failed_commit(self, solo: Worker, sqlite_db: Db) -> None:
        """The scope sits inside autoretry_for: a commit error of a listed type retries the task."""
        result = solo.tasks.commit_fails_once.delay("dave")
        number = wait(result)
        assert result.state == "SUCCESS", result.traceback
        first, second = solo.tasks.attempts["dave"]
        assert SESSIONS[first].events == ["commit failed", "rollback", "close"]
        assert SESSIONS[second].events == ["commit", "close"]
        assert number == second
        assert sqlite_db.texts() == ["dave-attempt-1"]

    def test_consecutive_tasks_in_one_worker_thread_leak_no_scope(self, solo: Worker, sqlite_db: Db) -> None:
        """Before and after each execution no scope is current in the worker thread; each has a new one."""
        del solo.probe.seen[:]
        first = solo.tasks.add_note.delay("erin")
        assert isinstance(wait(first), dict)
        failed = solo.tasks.add_note.delay("frank", fail=True)
        assert isinstance(wait(failed), ValueError)
        last = solo.tasks.add_note.delay("grace")
        last_report = wait(last)

        runs = [entry for entry in solo.probe.seen if entry[1] in {first.id, failed.id, last.id}]
        assert [(when, open_) for when, _, _, open_ in runs] == [("prerun", False), ("postrun", False)] * 3
        assert len({thread for _, _, thread, _ in runs}) == 1  # solo: one thread ran all three
        numbers = [*solo.tasks.attempts["erin"], *solo.tasks.attempts["frank"], last_report["session"]]
        assert len(set(numbers)) == 3
        assert sqlite_db.texts() == ["erin", "grace"]

    @pytest.mark.postgres
    def test_on_postgresql_commits_and_fails_a_task_whose_commit_fails(
        self, solo: Worker, postgres_url: str, unique_name: str
    ) -> None:
        """On PostgreSQL the deferred constraint fails at COMMIT: that task fails, nothing of it is saved."""
        for db in use_database(postgres_url, unique_name):
            saved = solo.tasks.add_note.delay("judy")
            assert wait(saved)["shared"] is True
            assert saved.state == "SUCCESS", saved.traceback
            lost = solo.tasks.add_orphan.delay("mallory")
            wait(lost)
            assert lost.state == "FAILURE"
            assert "sqlalchemy.exc.IntegrityError" in lost.traceback
            assert "violates foreign key constraint" in lost.traceback
            [number] = solo.tasks.attempts["mallory"]
            assert SESSIONS[number].events == ["commit failed", "rollback", "close"]
            assert db.texts() == ["judy"]
            assert checked_out(db) == 0


@pytest.mark.server
class TestThreadsWorker:
    """A threads-pool worker with two threads: tasks run at the same time."""

    def test_concurrent_tasks_run_in_separate_sessions(
        self, threads: Worker, sqlite_db_for_concurrent_writers: Db
    ) -> None:
        """Two tasks running at once in two threads have a Session each, shared by their injections."""
        threads.tasks.barrier.reset()
        results = [threads.tasks.meet.delay(text) for text in ("heidi", "ivan")]
        reports = [wait(result) for result in results]
        assert [result.state for result in results] == ["SUCCESS", "SUCCESS"], [r.traceback for r in results]
        assert all(report["shared"] for report in reports)
        assert len({report["session"] for report in reports}) == 2
        assert len({report["thread"] for report in reports}) == 2
        for report in reports:
            assert SESSIONS[report["session"]].events == ["commit", "close"]
        assert sqlite_db_for_concurrent_writers.texts() == ["heidi", "ivan"]
        assert checked_out(sqlite_db_for_concurrent_writers) == 0
        assert [open_ for _, _, _, open_ in threads.probe.seen] == [False] * 4


# --------------------------------------------------------------------------- eager mode


@pytest.fixture(scope="module")
def eager() -> Iterator[Tasks]:
    """An app in task_always_eager mode: `.delay()` runs the task in the caller; no broker needed."""
    app = Celery("test_celery_eager", task_cls=ScopedTask, broker="memory://", backend="cache+memory://")
    app.conf.update(task_always_eager=True, task_eager_propagates=False, task_store_eager_result=False)
    yield Tasks(app)
    app.close()


def test_eager_task_commits_in_its_own_session(eager: Tasks, sqlite_db: Db) -> None:
    """Under task_always_eager the task still gets its own Session, committed and closed on return."""
    result = eager.add_note.delay("ada")
    assert isinstance(result, EagerResult)
    report = result.get()
    assert report["shared"] is True
    assert SESSIONS[report["session"]].events == ["commit", "close"]
    assert sqlite_db.texts() == ["ada"]


def test_eager_task_inside_a_scope_gets_a_fresh_one_and_restores_the_callers(
    eager: Tasks, sqlite_db: Db
) -> None:
    """A task run eagerly inside a request scope does not share its session; the caller's scope comes back."""
    with request_scope() as outer:
        callers = container.session()
        report = eager.add_note.delay("bob").get()
        assert current_scope() is outer
        assert container.session() is callers
        assert report["session"] != callers.number
        assert SESSIONS[report["session"]].events == ["commit", "close"]  # before the caller's ends
        assert callers.events == []
    assert callers.events == ["close"]  # the caller wrote nothing: nothing to commit
    assert sqlite_db.texts() == ["bob"]


def test_eager_task_that_raises_rolls_back_and_fails(eager: Tasks, sqlite_db: Db) -> None:
    """An eager task's exception rolls back its writes; with eager_propagates off the result is a FAILURE."""
    result = eager.add_note.delay("carol", fail=True)
    assert result.state == "FAILURE"
    [number] = eager.attempts["carol"]
    assert SESSIONS[number].events == ["rollback", "close"]
    assert sqlite_db.texts() == []


def test_eager_task_whose_commit_fails_is_marked_failed(eager: Tasks, sqlite_db: Db) -> None:
    """A failed commit under eager mode is the task's failure, as in a worker."""
    result = eager.add_orphan.delay("orphan")
    assert result.state == "FAILURE"
    assert isinstance(result.result, IntegrityError)
    assert sqlite_db.texts() == []


def test_eager_retry_rolls_back_the_attempt_and_retries_in_a_new_session(eager: Tasks, sqlite_db: Db) -> None:
    """Eager mode retries after the failed attempt has rolled back, in a session of its own."""
    result = eager.add_then_retry.delay("dave")
    first, second = eager.attempts["dave"]
    assert result.get() == second
    assert SESSIONS[first].events == ["rollback", "close"]
    assert SESSIONS[second].events == ["commit", "close"]
    assert sqlite_db.texts() == ["dave-attempt-1"]


def test_calling_a_task_directly_runs_it_in_a_scope_of_its_own(eager: Tasks, sqlite_db: Db) -> None:
    """`task(...)` (no queue at all) opens a scope too, so code that calls tasks as functions still works."""
    report = eager.add_note("erin")
    assert SESSIONS[report["session"]].events == ["commit", "close"]
    with pytest.raises(NoRequestScopeError):
        current_scope()
    assert sqlite_db.texts() == ["erin"]


def notes_app(eager: Tasks, found: list[bool]) -> FastAPI:
    """An endpoint writing a note, then sending a task that looks for it: from its body, or after it."""
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    def look_for(text: str) -> None:
        found.append(eager.has_note.delay(text).get())

    # --8<-- [start:after_commit]
    @app.post("/notes")
    def create(text: str, after_response: bool, background: BackgroundTasks) -> None:
        container.notes().add(text)
        if after_response:
            background.add_task(look_for, text)  # after the response, so after the commit
        else:
            look_for(text)  # now: before the request's unit of work commits

    # --8<-- [end:after_commit]

    return app


def test_task_sent_from_the_endpoint_runs_before_the_request_commits(eager: Tasks, sqlite_db: Db) -> None:
    """A task enqueued in the endpoint can run before the request's commit and miss its writes."""
    found: list[bool] = []
    with TestClient(notes_app(eager, found)) as client:
        assert client.post("/notes", params={"text": "ada", "after_response": False}).status_code == 200
    assert found == [False]
    assert sqlite_db.texts() == ["ada"]


def test_task_sent_from_a_background_task_sees_the_requests_commit(eager: Tasks, sqlite_db: Db) -> None:
    """Starlette's background tasks run after the unit of work committed: the task finds the writes."""
    found: list[bool] = []
    with TestClient(notes_app(eager, found)) as client:
        assert client.post("/notes", params={"text": "bob", "after_response": True}).status_code == 200
    assert found == [True]
    assert sqlite_db.texts() == ["bob"]


# --------------------------------------------------------------------------- the class itself


def test_async_task_is_refused_when_it_is_defined(eager: Tasks) -> None:
    """Celery would never await an async body, so defining one is a TypeError that says so."""

    async def fetch() -> None:  # pragma: no cover - never runs
        pass

    with pytest.raises(TypeError, match="Celery runs task bodies synchronously"):
        eager.app.task(fetch, name=f"fetch-{uuid.uuid4().hex}", shared=False, lazy=False)


class RecordScope(ScopedTask[[], None]):
    """A class-based task: `run` defined on the class, extended by the subclasses below."""

    name = f"record-scope-{uuid.uuid4().hex}"
    scopes: ClassVar[list[RequestScope]] = []

    def run(self) -> None:
        self.scopes.append(current_scope())


class RecordScopeTwice(RecordScope):
    name = f"record-scope-twice-{uuid.uuid4().hex}"

    def run(self) -> None:
        self.scopes.append(current_scope())
        super().run()


class Announce:
    """A mixin with a run() of its own, ahead of the scoped class in the MRO."""

    def run(self) -> None:
        RecordScope.scopes.append(current_scope())
        super().run()  # type: ignore[misc]


class AnnouncedRecordScope(Announce, RecordScope):
    name = f"announced-record-scope-{uuid.uuid4().hex}"


class AddNote(ScopedTask[..., dict[str, Any]]):
    """A class-based task whose `run` is injected; container.wire() sees this module-level class."""

    name = f"add-note-class-{uuid.uuid4().hex}"

    @inject
    def run(
        self,
        text: str,
        session: RecordingSession = Provide[Container.session],
        service: NoteService = Provide[Container.service],
    ) -> dict[str, Any]:
        service.notes.add(text)
        return seen(session, service)


def test_class_based_task_is_injected_inside_its_scope_after_wiring(eager: Tasks, sqlite_db: Db) -> None:
    """Wiring a module never injects a task's Provide[...] parameters outside the task's scope."""
    container.wire(modules=[__name__])  # patches module-level classes' methods that have markers
    task = eager.app.register_task(AddNote())
    report = task.delay("ada").get()
    assert report["shared"] is True
    assert SESSIONS[report["session"]].events == ["commit", "close"]
    assert sqlite_db.texts() == ["ada"]


@pytest.mark.parametrize("task_class", [RecordScope, RecordScopeTwice, AnnouncedRecordScope])
def test_class_based_task_has_one_scope_per_execution_through_super_calls(
    eager: Tasks, task_class: type[RecordScope]
) -> None:
    """`run` overridden in subclasses or mixins, calling super().run(), still runs in one scope."""
    task = eager.app.register_task(task_class())
    del RecordScope.scopes[:]
    task.delay().get()
    task.delay().get()
    first, second = (
        RecordScope.scopes[: len(RecordScope.scopes) // 2],
        RecordScope.scopes[len(RecordScope.scopes) // 2 :],
    )
    assert len(set(map(id, first))) == 1
    assert len(set(map(id, second))) == 1
    assert first[0] is not second[0]
    assert first[0].closed
