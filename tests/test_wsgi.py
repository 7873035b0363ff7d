"""RequestScopeWSGIMiddleware: a real Flask app on a real WSGI server (werkzeug's) on 127.0.0.1.

The database is a real SQLite file (and, where marked, the real PostgreSQL server),
read back through a connection of its own. Every request waits for the server to
close the response body, which is where the scope is torn down, before the test
looks at the database or the pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from dependency_injector import containers, providers
from flask import Flask, Response, abort, g, request, stream_with_context
from sqlalchemy import Column, Integer, MetaData, String, Table, UniqueConstraint, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, registry, sessionmaker
from sqlalchemy.pool import NullPool
from werkzeug.serving import make_server
from werkzeug.wsgi import ClosingIterator

from di_request_scope import (
    NoRequestScopeError,
    RequestFailed,
    RequestScoped,
    ScopeMisuseError,
    current_scope,
)
from di_request_scope.sqlalchemy import LateCommitError, unit_of_work
from di_request_scope.wsgi import RequestScopeWSGIMiddleware

pytestmark = pytest.mark.server

WSGIApp = Callable[[dict[str, Any], Any], Iterable[bytes]]
TIMEOUT = 10  # seconds: a bound on waits that a working middleware ends at once


@dataclass
class Db:
    """A notes table with a UNIQUE text, and a way to read it from outside the app."""

    url: str
    table: Table
    model: type[Any]

    def texts(self) -> list[str]:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return sorted(conn.execute(select(self.table.c.text)).scalars())
        finally:
            engine.dispose()


def make_db(url: str, name: str, *, deferred: bool) -> Iterator[Db]:
    metadata = MetaData()
    # Deferred on PostgreSQL: a duplicate then fails in COMMIT itself. On SQLite it
    # fails in the flush that commit() runs, since the view never flushes.
    unique = (
        UniqueConstraint("text", deferrable=True, initially="DEFERRED")
        if deferred
        else UniqueConstraint("text")
    )
    table = Table(name, metadata, Column("id", Integer, primary_key=True), Column("text", String(50)), unique)

    class Note:
        def __init__(self, text: str) -> None:
            self.text = text

    registry().map_imperatively(Note, table)
    engine = create_engine(url, poolclass=NullPool)
    metadata.create_all(engine)
    try:
        yield Db(url, table, Note)
    finally:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # a transaction the app leaked fails the test, not hangs it
                conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            metadata.drop_all(conn)
        engine.dispose()


@pytest.fixture
def db(sqlite_url: str, unique_name: str) -> Iterator[Db]:
    yield from make_db(sqlite_url, unique_name, deferred=False)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db(request: pytest.FixtureRequest, sqlite_url: str, unique_name: str) -> Iterator[Db]:
    """The notes table on a SQLite file, then on the PostgreSQL server."""
    if request.param == "sqlite":
        yield from make_db(sqlite_url, unique_name, deferred=False)
    else:
        yield from make_db(request.getfixturevalue("postgres_url"), unique_name, deferred=True)


class Closes:
    """Counts response bodies whose close() returned: the scope was torn down by then."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def around(self, app: WSGIApp) -> WSGIApp:
        def app_telling_closes(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            return ClosingIterator(app(environ, start_response), self._closed)

        return app_telling_closes

    def _closed(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait_for(self, count: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.count >= count, timeout=TIMEOUT):
                pytest.fail(f"only {self.count} of {count} response bodies were closed")


@contextmanager
def serve(app: WSGIApp) -> Iterator[str]:
    """Serve ``app`` with werkzeug's threaded server on a free port of 127.0.0.1."""
    server = make_server("127.0.0.1", 0, app, threaded=True)  # listening on return: no wait needed
    # A short poll interval: shutdown() waits up to one interval for the loop to notice.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


class NoteRepository:
    def __init__(self, session: Session) -> None:
        self.session = session


class NoteService:
    def __init__(self, session: Session, notes: NoteRepository) -> None:
        self.session = session
        self.notes = notes


@dataclass
class App:
    """A Flask app on ``db``, its container, and what its views saw."""

    flask: Flask
    container: Any
    engine: Engine
    closes: Closes
    seen: dict[str, Any] = field(default_factory=dict)
    proceed: threading.Event = field(default_factory=threading.Event)
    client_gone: threading.Event = field(default_factory=threading.Event)
    teardowns: list[BaseException | None] = field(default_factory=list)
    barrier: threading.Barrier = field(default_factory=lambda: threading.Barrier(8))


def build_app(db: Db, **middleware: Any) -> App:
    """The documented set-up: ``app.wsgi_app = RequestScopeWSGIMiddleware(app.wsgi_app)``."""
    engine = create_engine(db.url)
    Note = db.model

    def tracked() -> Iterator[str]:
        # Created first in a request, so finalized last: after the session's teardown.
        try:
            yield "tracked"
        except BaseException as exc:
            state.teardowns.append(exc)
            raise
        state.teardowns.append(None)

    class Container(containers.DeclarativeContainer):
        tracker = RequestScoped(tracked)
        session = RequestScoped(unit_of_work, sessionmaker(bind=engine))
        notes = providers.Factory(NoteRepository, session=session)
        service = providers.Factory(NoteService, session=session, notes=notes)

    container = Container()
    flask = Flask(__name__)
    closes = Closes()
    flask.wsgi_app = closes.around(RequestScopeWSGIMiddleware(flask.wsgi_app, **middleware))  # type: ignore[method-assign]
    state = App(flask, container, engine, closes)

    def add(*texts: str) -> Session:
        container.tracker()
        session: Session = container.session()
        session.add_all([Note(t) for t in texts])
        return session

    @flask.before_request
    def resolve_early() -> None:
        if request.path == "/sessions":
            container.tracker()
            g.session = container.session()

    @flask.get("/sessions")
    def sessions() -> dict[str, int]:
        service = container.service()
        seen = {
            "before_request": g.session,
            "view": container.session(),
            "service": service.session,
            "repository": service.notes.session,
        }
        if "wait" in request.args:  # every concurrent request is in flight at once
            state.barrier.wait(TIMEOUT)
        return {name: session.hash_key for name, session in seen.items()}

    @flask.post("/notes")
    def create() -> tuple[str, int]:
        add(*request.args.getlist("text"))
        return "created", 201

    @flask.post("/notes/abort")
    def aborted() -> None:
        add(*request.args.getlist("text"))
        abort(409)

    @flask.post("/notes/crash")
    def crash() -> None:
        add(*request.args.getlist("text"))
        raise RuntimeError("boom")

    @flask.post("/notes/error-status")
    def error_status() -> tuple[str, int]:
        add(*request.args.getlist("text"))
        return "invalid", 422

    @flask.post("/notes/on-close")
    def on_close() -> Response:
        add(*request.args.getlist("text"))
        response = Response("created", status=201)
        response.call_on_close(lambda: state.seen.setdefault("closed_by_app", True))
        return response

    @flask.get("/notes/stream")
    def stream() -> Response:
        session = add(request.args["text"])

        @stream_with_context
        def body() -> Iterator[str]:
            state.seen["stream_session_is_the_view_session"] = container.session() is session
            session.add(Note(request.args["late"]))
            if "unflushed" not in request.args:
                session.flush()  # the late write holds a transaction until teardown
            yield "first;"
            state.proceed.wait(TIMEOUT)
            if request.args.get("fail") == "1":
                raise RuntimeError("the body failed")
            yield "second"

        return Response(body(), mimetype="text/plain")

    @flask.get("/notes/stream-forever")
    def stream_forever() -> Response:
        session = add(request.args["text"])

        @stream_with_context
        def body() -> Iterator[bytes]:
            session.add(Note(request.args["late"]))
            session.flush()
            yield b"first;"
            state.client_gone.wait(TIMEOUT)
            try:
                for _ in range(4096):  # the server's writes fail long before: the client has gone
                    yield b"x" * 65536
                state.seen["stream_completed"] = True
            except GeneratorExit:
                state.seen["stream_stopped_early"] = True
                raise

        return Response(body(), mimetype="application/octet-stream")

    @flask.get("/thread")
    def plain_thread() -> str:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                container.session()
            except NoRequestScopeError as exc:
                errors.append(exc)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join(TIMEOUT)
        return str(errors[0])

    return state


@contextmanager
def running(app: App) -> Iterator[httpx.Client]:
    with serve(app.flask) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        yield client
    app.engine.dispose()


def call(app: App, client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request, returned once the server has closed its body (the scope is torn down)."""
    closed = app.closes.count
    response = client.request(method, path, **kwargs)
    app.closes.wait_for(closed + 1)
    return response


def test_one_session_per_request_shared_by_every_injection_point(db: Db) -> None:
    """before_request, the view, a service and its repository get one Session; the next request a new one."""
    app = build_app(db)
    with running(app) as client:
        first = call(app, client, "GET", "/sessions").json()
        second = call(app, client, "GET", "/sessions").json()
    assert set(first) == {"before_request", "view", "service", "repository"}
    assert len(set(first.values())) == 1
    assert len(set(second.values())) == 1
    assert first["view"] != second["view"]
    assert app.engine.pool.checkedout() == 0


def test_concurrent_requests_in_threads_get_different_sessions(db: Db) -> None:
    """Eight requests in flight at once, each in its own server thread, hold eight different sessions."""
    app = build_app(db)
    with running(app) as client:
        results: list[dict[str, int]] = []
        threads = [
            threading.Thread(target=lambda: results.append(client.get("/sessions?wait=1").json()))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        app.closes.wait_for(8)
    assert len(results) == 8
    assert all(len(set(r.values())) == 1 for r in results)  # one session within each request
    assert len({r["view"] for r in results}) == 8  # and none shared between them
    assert app.engine.pool.checkedout() == 0


def test_successful_request_commits(any_db: Db) -> None:
    """A 201 request's writes are committed, and every connection is back in the pool."""
    app = build_app(any_db)
    with running(app) as client:
        response = call(app, client, "POST", "/notes", params={"text": ["a", "b"]})
        assert response.status_code == 201
        assert any_db.texts() == ["a", "b"]
        assert app.engine.pool.checkedout() == 0
    assert app.teardowns == [None]


@pytest.mark.parametrize(
    ("path", "status"),
    [("/notes/abort", 409), ("/notes/crash", 500), ("/notes/error-status", 422)],
)
def test_failed_request_rolls_back(any_db: Db, path: str, status: int) -> None:
    """abort(409), an exception Flask turns into a 500, and a returned 422 all roll back."""
    app = build_app(any_db)
    with running(app) as client:
        response = call(app, client, "POST", path, params={"text": "lost"})
        assert response.status_code == status
        assert any_db.texts() == []
        assert app.engine.pool.checkedout() == 0
    [failure] = app.teardowns
    assert isinstance(failure, RequestFailed)
    assert failure.status_code == status


def test_exception_leaving_the_app_rolls_back_and_tears_down_at_once(db: Db) -> None:
    """An exception that escapes the app (PROPAGATE_EXCEPTIONS) reaches finalizers; the server answers 500."""
    app = build_app(db)
    app.flask.config["PROPAGATE_EXCEPTIONS"] = True
    with running(app) as client:
        response = client.post("/notes/crash", params={"text": "lost"})
        assert response.status_code == 500  # werkzeug's own error page
    # No body came back, so nobody calls close(): the middleware tore the scope down in the call.
    assert app.closes.count == 0
    [failure] = app.teardowns
    assert isinstance(failure, RuntimeError)
    assert db.texts() == []
    assert app.engine.pool.checkedout() == 0


def test_failed_commit_answers_500_and_saves_nothing(any_db: Db, caplog: pytest.LogCaptureFixture) -> None:
    """A commit failing as the app starts a 201 makes it a 500 and saves nothing; the app's close runs."""
    app = build_app(any_db)
    with running(app) as client:
        assert call(app, client, "POST", "/notes", params={"text": "dup"}).status_code == 201
        with caplog.at_level(logging.ERROR, logger="di_request_scope"):
            response = call(app, client, "POST", "/notes/on-close", params={"text": ["other", "dup"]})
        assert response.status_code == 500
        assert response.text == "Internal Server Error"
        assert any_db.texts() == ["dup"]
        assert app.engine.pool.checkedout() == 0
    assert app.seen["closed_by_app"] is True  # the app's body was still closed (Flask's call_on_close)
    assert isinstance(app.teardowns[-1], IntegrityError)
    [record] = [r for r in caplog.records if r.name == "di_request_scope"]
    assert "answered 500, not '201 CREATED'" in record.getMessage()
    assert "POST /notes/on-close" in record.getMessage()
    assert isinstance(record.exc_info and record.exc_info[1], IntegrityError)


def test_streaming_body_keeps_the_session_open_and_commits_late_writes_at_the_end(any_db: Db) -> None:
    """The view's write is committed before the status; the body's write stays open until the body ends."""
    app = build_app(any_db)
    with running(app) as client:
        with client.stream("GET", "/notes/stream", params={"text": "early", "late": "late"}) as response:
            chunks = response.iter_raw()
            assert next(chunks) == b"first;"
            # The client has the status and the first chunk: the view's write is committed,
            # the body's write is not, and the session still holds its connection.
            assert any_db.texts() == ["early"]
            assert app.engine.pool.checkedout() == 1
            app.proceed.set()
            assert b"".join(chunks) == b"second"
        app.closes.wait_for(1)
        assert any_db.texts() == ["early", "late"]
        assert app.engine.pool.checkedout() == 0
    assert app.seen["stream_session_is_the_view_session"] is True
    assert app.teardowns == [None]


def test_failed_late_commit_is_logged_as_late_commit_error(db: Db, caplog: pytest.LogCaptureFixture) -> None:
    """A body's write that fails to commit after the 200 was sent is logged loudly, never dropped."""
    app = build_app(db)
    app.proceed.set()
    with running(app) as client:
        assert call(app, client, "POST", "/notes", params={"text": "dup"}).status_code == 201
        with caplog.at_level(logging.ERROR, logger="di_request_scope"):
            params = {"text": "early", "late": "dup", "unflushed": "1"}  # the duplicate fails in the commit
            response = call(app, client, "GET", "/notes/stream", params=params)
        assert response.text == "first;second"  # the 200 was gone before the late commit failed
        assert db.texts() == ["dup", "early"]
    [record] = [r for r in caplog.records if r.name == "di_request_scope"]
    assert record.getMessage() == "teardown failed in GET /notes/stream (request outcome: success)"
    error = record.exc_info and record.exc_info[1]
    assert isinstance(error, LateCommitError)
    assert isinstance(error.__cause__, IntegrityError)


def test_exception_in_the_streaming_body_rolls_back_the_late_writes(db: Db) -> None:
    """A body that raises after the status keeps the view's commit and rolls back what it wrote itself."""
    app = build_app(db)
    app.proceed.set()
    with running(app) as client:
        with pytest.raises(httpx.RemoteProtocolError):  # the server cut the chunked body short
            client.get("/notes/stream", params={"text": "early", "late": "late", "fail": "1"})
        app.closes.wait_for(1)
        assert db.texts() == ["early"]
        assert app.engine.pool.checkedout() == 0
    [failure] = app.teardowns
    assert isinstance(failure, RuntimeError)


def test_client_disconnecting_mid_stream_rolls_back_the_late_writes(any_db: Db) -> None:
    """The server stops iterating and calls close() early: the body's writes are rolled back."""
    app = build_app(any_db)
    with running(app) as client:
        with client.stream(
            "GET", "/notes/stream-forever", params={"text": "early", "late": "late"}
        ) as response:
            assert next(response.iter_raw()) == b"first;"
        # Leaving the block closed the half-read connection.
        app.client_gone.set()
        app.closes.wait_for(1)
        assert any_db.texts() == ["early"]
        assert app.engine.pool.checkedout() == 0
    assert app.seen.get("stream_stopped_early") is True
    assert "stream_completed" not in app.seen
    [failure] = app.teardowns
    assert isinstance(failure, RequestFailed)
    assert "client disconnected" in str(failure)


def test_is_failure_status_decides_which_statuses_roll_back(db: Db) -> None:
    """With is_failure_status=lambda s: s >= 500 a 409 commits, and a 500 still rolls back."""
    app = build_app(db, is_failure_status=lambda status: status >= 500)
    with running(app) as client:
        assert call(app, client, "POST", "/notes/abort", params={"text": "kept"}).status_code == 409
        assert call(app, client, "POST", "/notes/crash", params={"text": "lost"}).status_code == 500
    assert db.texts() == ["kept"]


def test_resolving_outside_a_request_raises_no_request_scope_error(db: Db) -> None:
    """Outside a request (the test itself, a plain thread a view starts) the session is refused, explained."""
    app = build_app(db)
    with running(app) as client:
        message = call(app, client, "GET", "/thread").text
    assert "outside a request scope" in message
    assert "contextvars.copy_context().run" in message
    with pytest.raises(NoRequestScopeError, match="outside a request scope"):
        app.container.session()


def test_teardown_errors_are_logged_with_the_request(db: Db, caplog: pytest.LogCaptureFixture) -> None:
    """A finalizer failing after the response is logged on di_request_scope with method, path and outcome."""

    def broken() -> Iterator[str]:
        yield "broken"
        raise OSError("cannot release")

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(broken)

    container = Container()
    flask = Flask(__name__)
    closes = Closes()
    flask.wsgi_app = closes.around(RequestScopeWSGIMiddleware(flask.wsgi_app))  # type: ignore[method-assign]
    flask.add_url_rule("/thing", "thing", container.thing)
    with serve(flask) as url, caplog.at_level(logging.ERROR, logger="di_request_scope"):
        assert httpx.get(f"{url}/thing", timeout=TIMEOUT).text == "broken"
        closes.wait_for(1)
    [record] = [r for r in caplog.records if r.name == "di_request_scope"]
    assert record.getMessage() == "teardown failed in GET /thing (request outcome: success)"
    assert isinstance(record.exc_info and record.exc_info[1], OSError)


def test_a_second_middleware_joins_the_first_ones_scope(db: Db) -> None:
    """Wrapped twice, with a layer resolving the session in between: one session, one teardown per request."""
    app = build_app(db)
    between: list[int] = []

    def layer(inner: WSGIApp) -> WSGIApp:
        def resolving(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            between.append(app.container.session().hash_key)  # the outer copy's scope
            return inner(environ, start_response)

        return resolving

    app.flask.wsgi_app = RequestScopeWSGIMiddleware(layer(app.flask.wsgi_app))  # type: ignore[method-assign]
    with running(app) as client:
        ids = call(app, client, "GET", "/sessions").json()
    assert between == [ids["view"]]
    assert len(set(ids.values())) == 1
    assert app.teardowns == [None]


# A WSGI app of a few lines, for what a framework never does: start_response in the
# first iteration, an async hook, async instances.


def raw_app(work: Callable[[], object], *, lazy_start: bool = False) -> WSGIApp:
    def eager(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        work()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    def lazy(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        # A generator: all of it, start_response included, runs in the first iteration.
        work()
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"ok"

    return lazy if lazy_start else eager


def test_commit_runs_when_start_response_is_called_in_the_first_iteration(db: Db) -> None:
    """A generator app calling start_response lazily (PEP 3333 allows it) still commits before the status."""
    engine = create_engine(db.url)
    session_factory = sessionmaker(bind=engine)
    session = RequestScoped(unit_of_work, session_factory)
    texts = iter(["a", "dup", "dup"])
    closes = Closes()
    app = closes.around(
        RequestScopeWSGIMiddleware(raw_app(lambda: session().add(db.model(next(texts))), lazy_start=True))
    )
    with serve(app) as url:
        statuses = []
        for _ in range(3):
            statuses.append(httpx.get(url, timeout=TIMEOUT).status_code)
            closes.wait_for(len(statuses))
    assert statuses == [200, 200, 500]
    assert db.texts() == ["a", "dup"]
    assert engine.pool.checkedout() == 0
    engine.dispose()


@pytest.mark.parametrize("offload", [None, True, False])
def test_every_offload_setting_commits_in_the_requests_own_thread(db: Db, offload: bool | None) -> None:
    """WSGI runs no event loop to keep free: ``offload`` changes nothing, the commit runs in place."""
    engine = create_engine(db.url)
    work_threads: list[int] = []
    commit_threads: list[int] = []

    class RecordingSession(Session):
        def commit(self) -> None:
            commit_threads.append(threading.get_ident())
            super().commit()

    session = RequestScoped(unit_of_work, sessionmaker(bind=engine, class_=RecordingSession), offload=offload)

    def work() -> None:
        work_threads.append(threading.get_ident())
        session().add(db.model("a"))

    closes = Closes()
    app = closes.around(RequestScopeWSGIMiddleware(raw_app(work)))
    with serve(app) as url:
        status = httpx.get(url, timeout=TIMEOUT).status_code
        closes.wait_for(1)
    assert status == 200
    assert db.texts() == ["a"]
    assert commit_threads == work_threads
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_a_hook_registered_by_a_running_hook_runs_before_the_status() -> None:
    """A hook that registers another (a commit that opens a second unit of work) does not lose it."""
    events: list[str] = []

    def late_hook() -> None:
        events.append("late hook")

    def first_hook() -> None:
        events.append("first hook")
        current_scope().call_before_response(late_hook)

    scoped = RequestScopeWSGIMiddleware(raw_app(lambda: current_scope().call_before_response(first_hook)))

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        def start(status: str, headers: Any, *exc_info: Any) -> Any:
            events.append(f"status {status}")
            return start_response(status, headers, *exc_info)

        return scoped(environ, start)

    with serve(app) as url:
        assert httpx.get(url, timeout=TIMEOUT).status_code == 200
    assert events == ["first hook", "late hook", "status 200 OK"]


def test_an_async_before_response_hook_is_refused_with_a_500(caplog: pytest.LogCaptureFixture) -> None:
    """WSGI runs no event loop: an async hook is closed unawaited, logged as ScopeMisuseError; a 500."""
    ran: list[str] = []
    coroutines: list[Coroutine[Any, Any, None]] = []

    async def commit() -> None:  # pragma: no cover - must never run
        ran.append("hook")

    def async_hook() -> Coroutine[Any, Any, None]:
        coroutines.append(commit())
        return coroutines[-1]

    closes = Closes()
    app = closes.around(
        RequestScopeWSGIMiddleware(raw_app(lambda: current_scope().call_before_response(async_hook)))
    )
    with serve(app) as url, caplog.at_level(logging.ERROR, logger="di_request_scope"):
        response = httpx.get(url, timeout=TIMEOUT)
        closes.wait_for(1)
    assert response.status_code == 500
    assert ran == []
    assert coroutines[0].cr_frame is None  # closed, so Python never warns it was not awaited
    [record] = [r for r in caplog.records if r.name == "di_request_scope"]
    error = record.exc_info and record.exc_info[1]
    assert isinstance(error, ScopeMisuseError)
    assert "use a sync Session" in str(error)


def test_an_async_instance_is_refused_at_creation(db: Db) -> None:
    """An AsyncSession-like instance could never be closed by a WSGI teardown: creating one raises."""

    async def make() -> str:
        return "async instance"

    thing = RequestScoped(make)
    errors: list[BaseException] = []

    def resolve() -> None:
        async def inside_a_loop() -> None:
            await thing()  # type: ignore[misc]

        try:
            asyncio.run(inside_a_loop())
        except ScopeMisuseError as exc:
            errors.append(exc)

    closes = Closes()
    with serve(closes.around(RequestScopeWSGIMiddleware(raw_app(resolve)))) as url:
        assert httpx.get(url, timeout=TIMEOUT).status_code == 200
        closes.wait_for(1)
    [error] = errors
    assert "cannot await its teardown" in str(error)


def test_close_tears_the_scope_down_exactly_once() -> None:
    """A server or middleware calling close() twice does not run teardown twice."""
    log: list[BaseException | None] = []

    def tracked() -> Iterator[str]:
        yield "x"
        log.append(None)

    thing = RequestScoped(tracked)
    app = RequestScopeWSGIMiddleware(raw_app(lambda: thing() and None))
    statuses: list[str] = []
    body = app(
        {"REQUEST_METHOD": "GET", "PATH_INFO": "/"},
        lambda status, headers, exc_info=None: statuses.append(status),
    )
    assert list(body) == [b"ok"]
    body.close()  # type: ignore[attr-defined]
    body.close()  # type: ignore[attr-defined]
    assert statuses == ["200 OK"]
    assert log == [None]


def test_the_scope_is_current_only_inside_the_app_call_and_each_body_step() -> None:
    """Between the steps the server's thread has no scope: a pooled thread serves the next request clean."""
    inside: list[bool] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        scope = current_scope()
        start_response("200 OK", [])
        yield b"a"
        inside.append(current_scope() is scope)
        yield b"b"

    body = RequestScopeWSGIMiddleware(app)({"REQUEST_METHOD": "GET"}, lambda *args: None)
    chunks = []
    for chunk in body:
        chunks.append(chunk)
        with pytest.raises(NoRequestScopeError):  # the server's own code, between two steps
            current_scope()
    body.close()  # type: ignore[attr-defined]
    assert chunks == [b"a", b"b"]
    assert inside == [True]
    with pytest.raises(NoRequestScopeError):
        current_scope()


def test_a_file_body_reaches_the_server_untouched_when_nothing_needs_tearing_down(tmp_path: Any) -> None:
    """On wsgiref's server, its wsgi.file_wrapper comes back as is (sendfile stays possible) unless the
    request created something to tear down; then the middleware's body sends it and tears down after."""
    from wsgiref.simple_server import WSGIRequestHandler
    from wsgiref.simple_server import make_server as make_wsgiref_server

    path = tmp_path / "file.txt"
    path.write_bytes(b"file body")
    torn_down: list[str] = []

    def tracked() -> Iterator[str]:
        yield "x"
        torn_down.append("x")

    thing = RequestScoped(tracked)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/with-instance":
            thing()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](path.open("rb"))  # its close() closes the file

    middleware = RequestScopeWSGIMiddleware(app)
    handed_to_server: list[str] = []

    def server_side(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = middleware(environ, start_response)
        handed_to_server.append(type(body).__name__)
        return body

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = make_wsgiref_server("127.0.0.1", 0, server_side, handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert httpx.get(f"{url}/plain", timeout=TIMEOUT).text == "file body"
        assert httpx.get(f"{url}/with-instance", timeout=TIMEOUT).text == "file body"
    finally:
        server.shutdown()  # the single-threaded server finished (and closed) the last request first
        server.server_close()
        thread.join(TIMEOUT)
    assert handed_to_server == ["FileWrapper", "_ScopedBody"]
    assert torn_down == ["x"]
