"""RequestScopeWSGIMiddleware around a real Django WSGI application, on a real server on 127.0.0.1.

Django is configured here with ``settings.configure()`` (no project on disk), the
way a project's ``wsgi.py`` is written:
``application = RequestScopeWSGIMiddleware(get_wsgi_application())``. The views
use dependency-injector and a SQLAlchemy unit of work on a real SQLite file.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from dependency_injector import containers, providers
from django.conf import settings
from django.core.signals import request_finished
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import path
from sqlalchemy import Column, Integer, MetaData, String, Table, UniqueConstraint, create_engine, select
from sqlalchemy.orm import Session, registry, sessionmaker
from sqlalchemy.pool import NullPool
from werkzeug.serving import make_server

from di_request_scope import RequestFailed, RequestScoped
from di_request_scope.sqlalchemy import unit_of_work
from di_request_scope.wsgi import RequestScopeWSGIMiddleware

pytestmark = pytest.mark.server

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("text", String(50)),
    UniqueConstraint("text"),
)


class Note:
    def __init__(self, text: str) -> None:
        self.text = text


registry().map_imperatively(Note, notes)


class NoteRepository:
    def __init__(self, session: Session) -> None:
        self.session = session


def tracked() -> Iterator[None]:
    """Created first in each request, so finalized last: records the request's outcome."""
    try:
        yield
    except BaseException as exc:
        seen["teardowns"].append(exc)
        raise
    seen["teardowns"].append(None)


class Container(containers.DeclarativeContainer):
    tracker = RequestScoped(tracked)
    session_factory = providers.Singleton(sessionmaker)  # bound to each test's engine by the fixture
    session = RequestScoped(unit_of_work, session_factory)
    notes = providers.Factory(NoteRepository, session=session)


container = Container()
seen: dict[str, Any] = {}


def add(request: HttpRequest) -> Session:
    container.tracker()
    session: Session = container.session()
    session.add_all([Note(text) for text in request.GET.getlist("text")])
    return session


def create(request: HttpRequest) -> HttpResponse:
    session = add(request)
    return JsonResponse(
        {"view": session.hash_key, "repository": container.notes().session.hash_key}, status=201
    )


def missing(request: HttpRequest) -> HttpResponse:
    add(request)
    raise Http404("no such note")


def crash(request: HttpRequest) -> HttpResponse:
    add(request)
    raise RuntimeError("boom")


def stream(request: HttpRequest) -> StreamingHttpResponse:
    session = add(request)

    def body() -> Iterator[bytes]:
        yield b"first;"
        container.session().add(Note(request.GET["late"]))  # after the status: committed at the end
        seen["stream_session_is_the_view_session"] = container.session() is session
        yield b"second"

    return StreamingHttpResponse(body())


urlpatterns = [
    path("notes", create),
    path("notes/missing", missing),
    path("notes/crash", crash),
    path("notes/stream", stream),
]


def on_request_finished(**kwargs: Any) -> None:
    # Django sends request_finished from the response's close(): still inside the scope.
    seen["request_finished_session"] = container.session().hash_key


@pytest.fixture(scope="module")
def django_application() -> Any:
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="not-a-secret",
            ALLOWED_HOSTS=["127.0.0.1"],
            ROOT_URLCONF=__name__,
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
            DATABASES={},
            LOGGING_CONFIG=None,  # leave the test run's logging alone
        )
    from django.core.wsgi import get_wsgi_application

    request_finished.connect(on_request_finished)
    try:
        yield RequestScopeWSGIMiddleware(get_wsgi_application())  # what a project's wsgi.py says
    finally:
        request_finished.disconnect(on_request_finished)


@pytest.fixture
def database(sqlite_url: str) -> Iterator[str]:
    engine = create_engine(sqlite_url)
    metadata.create_all(engine)
    container.session_factory.override(providers.Object(sessionmaker(bind=engine)))
    seen.clear()
    seen["teardowns"] = []
    try:
        yield sqlite_url
        assert engine.pool.checkedout() == 0
    finally:
        container.session_factory.reset_override()
        engine.dispose()


def texts(url: str) -> list[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return sorted(conn.execute(select(notes.c.text)).scalars())
    finally:
        engine.dispose()


@contextmanager
def served(application: Any) -> Iterator[httpx.Client]:
    """werkzeug's threaded server; server_close() waits for every request thread, close() included."""
    server = make_server("127.0.0.1", 0, application, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}", timeout=30) as client:
            yield client
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


def test_django_request_shares_one_session_and_commits(django_application: Any, database: str) -> None:
    """The view and a repository share the request's session; Django's request_finished sees it too."""
    with served(django_application) as client:
        response = client.post("/notes", params={"text": ["a", "b"]})
    assert response.status_code == 201
    ids = response.json()
    assert ids["view"] == ids["repository"] == seen["request_finished_session"]
    assert texts(database) == ["a", "b"]
    assert seen["teardowns"] == [None]


@pytest.mark.parametrize(("path", "status"), [("/notes/missing", 404), ("/notes/crash", 500)])
def test_django_error_responses_roll_back(
    django_application: Any, database: str, path: str, status: int
) -> None:
    """Http404 and an exception Django renders as a 500 both reach finalizers as RequestFailed."""
    with served(django_application) as client:
        response = client.get(path, params={"text": "lost"})
    assert response.status_code == status
    assert texts(database) == []
    [failure] = seen["teardowns"]
    assert isinstance(failure, RequestFailed)
    assert failure.status_code == status


def test_django_failed_commit_answers_500(django_application: Any, database: str) -> None:
    """A commit failing as Django starts a 201 turns it into a 500, and the response is still closed."""
    with served(django_application) as client:
        assert client.post("/notes", params={"text": "dup"}).status_code == 201
    seen.pop("request_finished_session")  # the server has closed that response: start afresh
    with served(django_application) as client:
        response = client.post("/notes", params={"text": ["other", "dup"]})
    assert response.status_code == 500
    assert texts(database) == ["dup"]
    assert "request_finished_session" in seen  # Django's close() ran: its request_finished was sent


def test_django_streaming_response_commits_after_the_body(django_application: Any, database: str) -> None:
    """A StreamingHttpResponse body runs inside the scope; its write is committed when the body ends."""
    with served(django_application) as client:
        response = client.get("/notes/stream", params={"text": "early", "late": "late"})
    assert response.text == "first;second"
    assert seen["stream_session_is_the_view_session"] is True
    assert texts(database) == ["early", "late"]
    assert seen["teardowns"] == [None]
