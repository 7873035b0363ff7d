"""Observers and logging: what a scope reports of its life, through a real FastAPI app and real SQLite."""

from __future__ import annotations

import logging
import threading
import wsgiref.util
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import pytest
import sqlalchemy
from dependency_injector import containers, providers
from dependency_injector.wiring import inject
from fastapi import Depends, FastAPI, HTTPException, WebSocket
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from di_request_scope import (
    LoggingObserver,
    NoRequestScopeError,
    Observation,
    RequestScope,
    RequestScoped,
    RequestScopeMiddleware,
    ScopeObserver,
    current_scope,
    observe,
    request_scope,
)
from di_request_scope.fastapi import Provide
from di_request_scope.sqlalchemy import unit_of_work
from di_request_scope.wsgi import RequestScopeWSGIMiddleware


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --8<-- [start:recorder]
class Recorder(ScopeObserver):
    """Keep every event, in order; observers may be called from worker threads."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()

    def record(self, *event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def scope_opened(self, scope: RequestScope) -> None:
        self.record("opened", scope.origin)

    def instance_created(self, scope: RequestScope, provider: str, instance: object) -> None:
        self.record("created", provider)

    def scope_failed(self, scope: RequestScope, failure: BaseException) -> None:
        self.record("failed", failure)

    def instance_finalized(
        self, scope: RequestScope, provider: str, duration: float, error: BaseException | None
    ) -> None:
        self.record("finalized", provider, error)

    def teardown_error(self, scope: RequestScope, provider: str, error: BaseException) -> None:
        self.record("teardown_error", provider, error)

    def scope_closed(self, scope: RequestScope, errors: Sequence[BaseException]) -> None:
        self.record("closed", scope.failure, tuple(errors))


# --8<-- [end:recorder]


class Repository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, text: str) -> None:
        self.session.execute(sqlalchemy.text("INSERT INTO notes (text) VALUES (:text)"), {"text": text})


class Service:
    def __init__(self, repository: Repository) -> None:
        self.repository = repository


class AuditFlushError(Exception):
    pass


def repository(session: Session) -> Iterator[Repository]:
    yield Repository(session)


def service(repository: Repository) -> Iterator[Service]:
    yield Service(repository)


def audit() -> Iterator[str]:
    yield "audit"
    raise AuditFlushError("the audit log could not be flushed")


async def cache() -> AsyncIterator[str]:
    yield "cache"


class Container(containers.DeclarativeContainer):
    config = providers.Configuration()
    engine = providers.Singleton(sqlalchemy.create_engine, config.url)
    session_factory = providers.Singleton(sessionmaker, bind=engine)
    session = RequestScoped(unit_of_work, session_factory)
    repository = RequestScoped(repository, session=session)
    service = RequestScoped(service, repository=repository)
    audit = RequestScoped(audit)
    cache = RequestScoped(cache)


app = FastAPI()
app.add_middleware(RequestScopeMiddleware)


@app.post("/notes")
@inject
async def add_note(text: str, notes: Service = Depends(Provide[Container.service])) -> dict[str, str | None]:
    notes.repository.add(text)
    if text == "conflict":
        raise HTTPException(409, "that note exists")
    return {"origin": current_scope().origin}


@app.get("/count")
@inject
async def count(session: Session = Depends(Provide[Container.session])) -> int:
    return session.execute(sqlalchemy.text("SELECT count(*) FROM notes")).scalar_one()


@app.get("/nothing")
async def nothing() -> str:
    return "nothing"


@app.get("/audited")
@inject
async def audited(entry: str = Depends(Provide[Container.audit])) -> str:
    return entry


@app.get("/cached")
@inject
async def cached(value: str = Depends(Provide[Container.cache])) -> str:
    return value


@app.websocket("/ws")
@inject
async def socket(websocket: WebSocket, value: str = Depends(Provide[Container.cache])) -> None:
    await websocket.accept()
    await websocket.send_text(value)
    await websocket.close()


@pytest.fixture
def container(sqlite_url: str) -> Iterator[Container]:
    container = Container()
    container.config.url.from_value(sqlite_url)
    with container.engine().begin() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE notes (text VARCHAR PRIMARY KEY)"))
    container.wire(modules=[__name__])
    yield container
    container.unwire()
    container.engine().dispose()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recorder = Recorder()
    with observe(recorder):
        yield recorder


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def saved_notes(container: Container) -> list[str]:
    with container.engine().connect() as connection:
        return list(connection.execute(sqlalchemy.text("SELECT text FROM notes")).scalars())


@pytest.mark.anyio
async def test_a_request_reports_its_instances_in_creation_and_teardown_order(
    container: Container, recorder: Recorder
) -> None:
    """Opened with its method and path, instances created innermost first, finalized in reverse, closed."""
    async with client() as http:
        response = await http.post("/notes", params={"text": "hello"})
    assert response.json() == {"origin": "POST /notes"}
    assert recorder.events == [
        ("opened", "POST /notes"),
        ("created", "Container.session"),
        ("created", "Container.repository"),
        ("created", "Container.service"),
        ("finalized", "Container.service", None),
        ("finalized", "Container.repository", None),
        ("finalized", "Container.session", None),
        ("closed", None, ()),
    ]
    assert saved_notes(container) == ["hello"]


@pytest.mark.anyio
async def test_a_teardown_run_in_place_is_reported_too(container: Container, recorder: Recorder) -> None:
    """A request that created nothing, and one whose session was already committed (teardown
    without a task or a thread), report their close like any other."""
    async with client() as http:
        assert (await http.get("/nothing")).json() == "nothing"
        assert (await http.get("/count")).json() == 0
    assert recorder.events == [
        ("opened", "GET /nothing"),
        ("closed", None, ()),
        ("opened", "GET /count"),
        ("created", "Container.session"),
        ("finalized", "Container.session", None),
        ("closed", None, ()),
    ]


@pytest.mark.anyio
async def test_a_failed_request_reports_its_failure_when_it_closes(
    container: Container, recorder: Recorder
) -> None:
    """An HTTPException fails the scope before teardown; observers hear it then and when it closes."""
    async with client() as http:
        response = await http.post("/notes", params={"text": "conflict"})
    assert response.status_code == 409
    failure = recorder.events[4][1]
    assert failure.status_code == 409
    assert recorder.events == [
        ("opened", "POST /notes"),
        ("created", "Container.session"),
        ("created", "Container.repository"),
        ("created", "Container.service"),
        ("failed", failure),
        ("finalized", "Container.service", None),
        ("finalized", "Container.repository", None),
        ("finalized", "Container.session", None),
        ("closed", failure, ()),
    ]
    assert saved_notes(container) == []  # rolled back


@pytest.mark.anyio
async def test_a_teardown_error_is_reported_to_observers_and_still_logged(
    container: Container, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """The failing step is reported as finalized with its error, as a teardown error, and when closing."""
    async with client() as http:
        response = await http.get("/audited")
    assert response.status_code == 200
    error = recorder.events[2][2]
    assert isinstance(error, AuditFlushError)
    assert recorder.events == [
        ("opened", "GET /audited"),
        ("created", "Container.audit"),
        ("finalized", "Container.audit", error),
        ("teardown_error", "Container.audit", error),
        ("closed", None, (error,)),
    ]
    assert [r.exc_info[1] for r in caplog.records if r.levelno == logging.ERROR and r.exc_info] == [error]


@pytest.mark.anyio
async def test_async_instances_are_reported_when_created_and_finalized(
    container: Container, recorder: Recorder
) -> None:
    """An async generator's instance is reported once its creation was awaited, and its async teardown too."""
    async with client() as http:
        assert (await http.get("/cached")).json() == "cache"
    assert recorder.events == [
        ("opened", "GET /cached"),
        ("created", "Container.cache"),
        ("finalized", "Container.cache", None),
        ("closed", None, ()),
    ]


class Broken(ScopeObserver):
    def scope_opened(self, scope: RequestScope) -> None:
        raise RuntimeError("broken observer")

    def instance_created(self, scope: RequestScope, provider: str, instance: object) -> None:
        raise RuntimeError("broken observer")

    def scope_closed(self, scope: RequestScope, errors: Sequence[BaseException]) -> None:
        raise RuntimeError("broken observer")


@pytest.mark.anyio
async def test_an_observer_that_raises_breaks_no_request_and_is_logged_once_per_event(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests succeed and commit, an observer registered after it hears everything, logs never repeat."""
    recorder = Recorder()
    with observe(Broken()), observe(recorder):
        async with client() as http:
            assert (await http.post("/notes", params={"text": "one"})).status_code == 200
            with observe(Recorder()):  # other observers come: still not logged again
                assert (await http.post("/notes", params={"text": "two"})).status_code == 200
    assert saved_notes(container) == ["one", "two"]
    assert len(recorder.events) == 16
    logged = [r.getMessage() for r in caplog.records if r.name == "di_request_scope"]
    assert len(logged) == 3
    assert all("the request went on" in message for message in logged)
    assert {message.split(" raised in ")[1].split("(")[0] for message in logged} == {
        "scope_opened",
        "instance_created",
        "scope_closed",
    }


class Interrupted(BaseException):
    """Not an Exception: observers' errors are caught, this (like pytest.fail) goes through."""


class Interrupting(ScopeObserver):
    def scope_opened(self, scope: RequestScope) -> None:
        raise Interrupted


async def _no_body() -> dict[str, Any]:  # pragma: no cover - never called
    """receive() of a raw ASGI call whose app reads no body."""
    return {"type": "http.request", "body": b""}


async def _drop(message: Any) -> None:
    """send() of a raw ASGI call whose messages the test does not read."""


class CurrentWhenOpened(ScopeObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[str | None, bool]] = []

    def scope_opened(self, scope: RequestScope) -> None:
        self.seen.append((scope.origin, current_scope() is scope))


@pytest.mark.anyio
async def test_observers_hear_a_scope_open_while_it_is_current() -> None:
    """An observer may resolve from, or look up, the scope it is told about."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    observer = CurrentWhenOpened()
    made_before = request_scope()
    with observe(observer):
        with made_before:  # observers registered when it is entered hear it
            pass
        async with request_scope():
            pass
        await RequestScopeMiddleware(app)({"type": "http", "method": "GET", "path": "/"}, _no_body, _drop)
    assert observer.seen == [("request_scope()", True), ("request_scope()", True), ("GET /", True)]


@pytest.mark.anyio
async def test_an_observer_interrupting_the_opening_leaves_no_scope_current() -> None:
    """The BaseException propagates from the opener, and the caller's context is as it was."""

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
        raise AssertionError("the app ran")

    http = {"type": "http", "method": "GET", "path": "/", "headers": []}
    websocket = {"type": "websocket", "path": "/ws", "headers": []}
    opener = request_scope()
    with observe(Interrupting()):
        with pytest.raises(Interrupted), opener:
            pass  # pragma: no cover - never entered
        with pytest.raises(Interrupted):
            async with request_scope():
                pass  # pragma: no cover - never entered
        for asgi_scope, middleware in [
            (http, RequestScopeMiddleware(app)),
            (websocket, RequestScopeMiddleware(app)),
            (websocket, RequestScopeMiddleware(app, websocket_scope="message")),
        ]:
            with pytest.raises(Interrupted):
                await middleware(dict(asgi_scope), _no_body, _drop)
            with pytest.raises(NoRequestScopeError):
                current_scope()
    with pytest.raises(NoRequestScopeError):
        current_scope()
    with opener as scope:  # it never opened, so it still can
        assert current_scope() is scope


@pytest.mark.anyio
async def test_a_removed_observer_hears_nothing_more(container: Container) -> None:
    """remove() and the end of a with block both stop the events; removing twice is harmless."""
    first, second = Recorder(), Recorder()
    registration = observe(first)
    with observe(second):
        pass
    registration.remove()
    registration.remove()
    async with client() as http:
        assert (await http.post("/notes", params={"text": "quiet"})).json() == {"origin": None}
    assert first.events == second.events == []


def test_an_observer_hears_every_scope_opened_while_registered_from_open_to_close() -> None:
    """Events always come in pairs: a scope opened before registration reports nothing, one opened
    during it reports its close even after the observer was removed."""
    recorder = Recorder()
    with request_scope(), observe(recorder):
        pass
    assert recorder.events == []
    registration = observe(recorder)
    with request_scope():
        registration.remove()
    assert recorder.events == [("opened", "request_scope()"), ("closed", None, ())]


def test_a_scope_its_opener_did_not_announce_is_announced_at_its_first_event(recorder: Recorder) -> None:
    """A RequestScope made by other code than the library's openers still reports in pairs."""
    scope = RequestScope()
    scope.close()
    assert recorder.events == [("opened", None), ("closed", None, ())]


@pytest.mark.anyio
async def test_no_observer_means_no_event_and_no_log(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    """Without observers nothing is logged even at DEBUG, and the scope never records its origin."""
    caplog.set_level(logging.DEBUG, logger="di_request_scope")
    async with client() as http:
        assert (await http.post("/notes", params={"text": "plain"})).json() == {"origin": None}
    assert [r for r in caplog.records if r.name == "di_request_scope"] == []


@pytest.mark.anyio
async def test_the_logging_observer_logs_the_scope_life_at_debug(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    """Opened, created, failed with the reason, finalized with duration and outcome, closed likewise."""
    caplog.set_level(logging.DEBUG, logger="di_request_scope")
    with observe(LoggingObserver()):
        async with client() as http:
            await http.post("/notes", params={"text": "logged"})
            await http.post("/notes", params={"text": "conflict"})
    messages = [r.getMessage() for r in caplog.records if r.name == "di_request_scope"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "di_request_scope")
    first, second = messages[0].split()[2], messages[8].split()[2]
    assert first != second  # a number tells concurrent scopes apart
    assert messages[0] == f"request scope {first} (POST /notes) opened"
    assert messages[1] == f"request scope {first} (POST /notes): created Container.session"
    assert messages[4].startswith(f"request scope {first} (POST /notes): finalized Container.service in ")
    assert messages[4].endswith(" ms (outcome: success)")
    assert messages[7].startswith(f"request scope {first} (POST /notes) closed after ")
    assert messages[7].endswith(" ms: success")
    assert (
        messages[12]
        == f"request scope {second} (POST /notes) failed: RequestFailed: the response status was 409"
    )
    assert messages[13].endswith(" ms (outcome: failure)")
    assert messages[16].endswith(" ms: failure: RequestFailed: the response status was 409")
    assert len(messages) == 17


@pytest.mark.anyio
async def test_the_logging_observer_is_silent_above_its_level(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    """Registered in production with the logger at INFO, it logs nothing until the level is lowered."""
    caplog.set_level(logging.INFO, logger="di_request_scope")
    with observe(LoggingObserver()):
        async with client() as http:
            await http.post("/notes", params={"text": "quiet"})
    assert [r for r in caplog.records if r.name == "di_request_scope"] == []


def test_a_decorated_job_is_named_after_its_function() -> None:
    """@request_scope() tells observers which function the scope belongs to."""

    @request_scope()
    def import_notes() -> str | None:
        return current_scope().origin

    with observe(Recorder()):
        assert import_notes() == (
            "@request_scope() test_a_decorated_job_is_named_after_its_function.<locals>.import_notes"
        )


def test_a_websocket_connection_is_reported_as_one_scope(container: Container, recorder: Recorder) -> None:
    """Its origin says WEBSOCKET and the path; the instance is finalized when the connection ends."""
    with TestClient(app) as http, http.websocket_connect("/ws") as websocket:
        assert websocket.receive_text() == "cache"
    assert recorder.events == [
        ("opened", "WEBSOCKET /ws"),
        ("created", "Container.cache"),
        ("finalized", "Container.cache", None),
        ("closed", None, ()),
    ]


def test_a_wsgi_request_is_reported_with_its_method_and_path(recorder: Recorder) -> None:
    """The WSGI middleware names the scope, and a scope with nothing to tear down still closes."""

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/plain"}
    wsgiref.util.setup_testing_defaults(environ)
    body = RequestScopeWSGIMiddleware(wsgi_app)(environ, lambda status, headers, exc_info=None: None)
    assert b"".join(body) == b"ok"
    body.close()  # type: ignore[attr-defined]
    assert recorder.events == [("opened", "GET /plain"), ("closed", None, ())]


def test_observe_refuses_what_is_not_an_observer_and_a_second_registration() -> None:
    """A class instead of an instance, or the same observer twice, is refused with a hint."""
    with pytest.raises(TypeError, match="expects a ScopeObserver instance"):
        observe(Recorder)  # type: ignore[arg-type]
    recorder = Recorder()
    with observe(recorder) as registration:
        assert isinstance(registration, Observation)
        with pytest.raises(ValueError, match="already observing"):
            observe(recorder)
