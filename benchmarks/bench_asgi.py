"""End to end, in process: µs per request through FastAPI, driven by a direct ASGI call.

No server and no HTTP client: each request builds the ASGI scope dict and calls
the app with ``receive``/``send`` coroutines that behave like a server's (the
request body once, then a ``receive()`` that waits until the client goes away).
All requests run in one long-lived task on one event loop.

Every candidate serves the same two endpoints, ``/async`` (``async def``) and
``/sync`` (``def``, run by FastAPI in its threadpool). Each gets a ``Service``
whose ``Repository`` and the service itself share one SQLAlchemy ``Session`` per
request; the endpoint runs one ``SELECT 1`` through the repository, and the
session is committed and closed when the request ends. SQLite in memory, one
connection (``StaticPool``), so the database costs as little as possible and
the integration's own cost shows.

Before timing, every candidate is checked with two requests per endpoint:
status 200, the repository and the service got the same session, the two
requests got different sessions, and each session's transaction had ended
(committed and closed) by the time the app returned.

Candidates:
  bare                      no session, no middleware: the floor
  bare + middleware         RequestScopeMiddleware around the same endpoints, nothing resolved
  pass-through middleware   a reference: a pure ASGI middleware that only calls the app, the
                            cost of one more layer in the stack
  minimal scope middleware  a reference: the least a request-scope middleware can do (a scope in
                            the ContextVar, ``send`` wrapped to see the status): the floor for the above
  hand-written session      a reference: the endpoint opens, commits and closes its own session,
                            no DI at all: the floor for every candidate below
  Depends(get_db)           FastAPI's tutorial pattern: a ``yield`` dependency; repository and
                            service built by ``async def`` dependencies (no extra thread hop)
  dishka                    ``make_async_container``, ``setup_dishka``, ``@inject`` + ``FromDishka``
                            (dishka's FastAPI integration); REQUEST-scoped session, repository, service
  that-depends              ``DIContextMiddleware(Container)`` + ``Depends(Container.service)``;
                            the session a ``ContextResource``
  ContextLocalSingleton     dependency-injector's ``providers.ContextLocalSingleton`` session, a pure
                            ASGI middleware that resets it per request and closes what was opened,
                            ``@inject`` + ``Depends(Provide[...])``
  RequestScoped, Provide    ``RequestScoped(unit_of_work, UnitOfWorkSessionLocal)`` (a sessionmaker
                            of its own) + ``RequestScopeMiddleware``, dependency-injector's own
                            ``Provide`` marker and ``@inject``
  RequestScoped, fastapi.Provide   the same with ``di_request_scope.fastapi.Provide`` (awaited by
                            FastAPI on the event loop instead of in its threadpool)
  RequestScoped, fastapi.inject    ``di_request_scope.fastapi.inject`` with ``Annotated[Service,
                            Provide[...]]``: the parameter hidden from FastAPI, no ``Depends``
  ..., offload=False        the same with ``unit_of_work(..., offload=False)``: a ``def`` endpoint's
                            commit runs on the event loop, as dishka's and that-depends' do
"""

# No `from __future__ import annotations` here: dependency-injector's @inject reads the
# Annotated[..., Depends(Provide[...])] markers from the evaluated signature.

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Annotated, Any

import dishka
from dependency_injector import containers, providers
from dependency_injector.wiring import Provide as ClassicProvide
from dependency_injector.wiring import inject
from dishka.integrations.fastapi import FromDishka, setup_dishka
from dishka.integrations.fastapi import inject as dishka_inject
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool
from that_depends import BaseContainer
from that_depends import providers as td_providers
from that_depends.providers import DIContextMiddleware

from di_request_scope import RequestFailed, RequestScope, RequestScoped, RequestScopeMiddleware
from di_request_scope._scope import _current
from di_request_scope.fastapi import Provide as AsyncProvide
from di_request_scope.fastapi import inject as hidden_inject
from di_request_scope.sqlalchemy import unit_of_work

from ._harness import Candidate, Result, Section, Settings, ameasure, async_timer, markdown_table

NAME = "asgi"

# Bound to the engine in endpoint_candidates(); every peer's sessions come from here.
SessionLocal = sessionmaker()
# The same for RequestScoped's candidates: unit_of_work listens for its sessionmaker's
# transaction begins, and the peers' sessions must not pay for that.
UnitOfWorkSessionLocal = sessionmaker()
SELECT_ONE = text("SELECT 1")


class _Probe:
    """Collects the services the endpoints used while candidates are checked; None while timing."""

    seen: "list[Service] | None" = None


_probe = _Probe()


class Repository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def one(self) -> int:
        return int(self.session.execute(SELECT_ONE).scalar_one())


class Service:
    def __init__(self, repository: Repository, session: Session) -> None:
        self.repository = repository
        self.session = session

    def run(self) -> dict[str, int]:
        if _probe.seen is not None:
            _probe.seen.append(self)
        return {"value": self.repository.one()}


def session_generator() -> Iterator[Session]:
    """One session per request, committed on success and closed: FastAPI's and the peers' version."""
    with SessionLocal() as session:
        yield session
        session.commit()


# --- bare ------------------------------------------------------------------------------


class PassThroughMiddleware:
    """A pure ASGI middleware that only awaits the app: what one more layer in the stack costs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class MinimalScopeMiddleware:
    """The least a request-scope middleware can do, as a floor for RequestScopeMiddleware's own cost.

    A scope per request, set in the ContextVar, and ``send`` wrapped to see the
    response status (a framework's error page never reaches an outer middleware
    as an exception). No disconnect check, no before-response commit, no
    WebSockets, nothing logged: a reference, not a candidate.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_scope = RequestScope()
        token = _current.set(request_scope)

        def watch_status(message: Any) -> Any:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                request_scope.fail(RequestFailed(f"the response status was {message['status']}"))
            return send(message)

        try:
            await self.app(scope, receive, watch_status)
        except BaseException as exc:
            request_scope.fail(exc)
            raise
        finally:
            try:
                request_scope.close()
            finally:
                _current.reset(token)


def bare_app(*, middleware: Any = None) -> FastAPI:
    app = FastAPI()
    if middleware is not None:
        app.add_middleware(middleware)

    @app.get("/async")
    async def async_endpoint() -> dict[str, int]:
        return {"value": 1}

    @app.get("/sync")
    def sync_endpoint() -> dict[str, int]:
        return {"value": 1}

    return app


# --- hand-written: no DI -----------------------------------------------------------------


def hand_written_app() -> FastAPI:
    """The endpoint opens, commits and closes its session itself: the floor for every DI candidate.

    It does what they do for the database (one session shared by the repository and
    the service, committed before the response, closed) and nothing else: no
    middleware, no container, no rollback on an error status.
    """
    app = FastAPI()

    @app.get("/async")
    async def async_endpoint() -> dict[str, int]:
        with SessionLocal() as session:
            result = Service(Repository(session), session).run()
            session.commit()
        return result

    @app.get("/sync")
    def sync_endpoint() -> dict[str, int]:
        with SessionLocal() as session:
            result = Service(Repository(session), session).run()
            session.commit()
        return result

    return app


# --- FastAPI Depends(get_db) -------------------------------------------------------------


def depends_app() -> FastAPI:
    app = FastAPI()

    def get_db() -> Iterator[Session]:  # a sync generator, as in FastAPI's SQL tutorial
        yield from session_generator()

    async def get_repository(session: Annotated[Session, Depends(get_db)]) -> Repository:
        return Repository(session)

    async def get_service(
        repository: Annotated[Repository, Depends(get_repository)],
        session: Annotated[Session, Depends(get_db)],  # cached per request: the same session
    ) -> Service:
        return Service(repository, session)

    @app.get("/async")
    async def async_endpoint(service: Annotated[Service, Depends(get_service)]) -> dict[str, int]:
        return service.run()

    @app.get("/sync")
    def sync_endpoint(service: Annotated[Service, Depends(get_service)]) -> dict[str, int]:
        return service.run()

    return app


# --- dishka ------------------------------------------------------------------------------


class DishkaProvider(dishka.Provider):
    @dishka.provide(scope=dishka.Scope.REQUEST)
    def session(self) -> Iterator[Session]:
        yield from session_generator()

    repository = dishka.provide(Repository, scope=dishka.Scope.REQUEST)
    service = dishka.provide(Service, scope=dishka.Scope.REQUEST)


def dishka_app() -> tuple[FastAPI, dishka.AsyncContainer]:
    app = FastAPI()
    container = dishka.make_async_container(DishkaProvider())
    setup_dishka(container, app)

    @app.get("/async")
    @dishka_inject
    async def async_endpoint(service: FromDishka[Service]) -> dict[str, int]:
        return service.run()

    @app.get("/sync")
    @dishka_inject  # for a def endpoint: an async Depends per parameter, the endpoint in the threadpool
    def sync_endpoint(service: FromDishka[Service]) -> dict[str, int]:
        return service.run()

    return app, container


# --- that-depends ------------------------------------------------------------------------


class BenchAsgiTDContainer(BaseContainer):
    default_scope = None  # no named scope: the cheapest configuration
    session = td_providers.ContextResource(session_generator)
    repository = td_providers.Factory(Repository, session)
    service = td_providers.Factory(Service, repository, session)


def that_depends_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(DIContextMiddleware, BenchAsgiTDContainer)
    TDService = Annotated[Service, Depends(BenchAsgiTDContainer.service)]  # noqa: N806 - a type alias

    @app.get("/async")
    async def async_endpoint(service: TDService) -> dict[str, int]:
        return service.run()

    @app.get("/sync")
    def sync_endpoint(service: TDService) -> dict[str, int]:
        return service.run()

    return app


# --- dependency-injector: ContextLocalSingleton + a resetting middleware -----------------

_opened: ContextVar[list[Session] | None] = ContextVar("bench_context_local_opened", default=None)


def context_local_session() -> Session:
    session = SessionLocal()
    opened = _opened.get()
    if opened is not None:  # the list is shared with threadpool copies of the context
        opened.append(session)
    return session


class ContextLocalContainer(containers.DeclarativeContainer):
    session = providers.ContextLocalSingleton(context_local_session)
    repository = providers.Factory(Repository, session=session)
    service = providers.Factory(Service, repository=repository, session=session)


class ContextLocalResetMiddleware:
    """The usual hand-written companion of ContextLocalSingleton, as a pure ASGI middleware.

    Forgets the context-local instance at the start of each request (requests that
    share a context would otherwise share the session) and commits and closes every
    session opened during the request. A sync endpoint resolves in a copy of the
    context, so the middleware cannot see the instance itself: it keeps a list.
    """

    def __init__(self, app: Any, provider: providers.ContextLocalSingleton[Session]) -> None:
        self.app = app
        self.provider = provider

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.provider.reset()
        opened: list[Session] = []
        token = _opened.set(opened)
        ok = False
        try:
            await self.app(scope, receive, send)
            ok = True
        finally:
            _opened.reset(token)
            self.provider.reset()
            for session in opened:
                if ok:
                    session.commit()
                session.close()


CLService = Annotated[Service, Depends(ClassicProvide[ContextLocalContainer.service])]


@inject
async def context_local_async(service: CLService) -> dict[str, int]:
    return service.run()


@inject
def context_local_sync(service: CLService) -> dict[str, int]:
    return service.run()


def context_local_app(container: ContextLocalContainer) -> FastAPI:
    app = FastAPI()
    app.add_middleware(ContextLocalResetMiddleware, provider=container.session)
    app.get("/async")(context_local_async)
    app.get("/sync")(context_local_sync)
    return app


# --- di_request_scope ------------------------------------------------------------------------


class RequestScopedContainer(containers.DeclarativeContainer):
    session = RequestScoped(unit_of_work, UnitOfWorkSessionLocal)
    repository = providers.Factory(Repository, session=session)
    service = providers.Factory(Service, repository=repository, session=session)


ClassicService = Annotated[Service, Depends(ClassicProvide[RequestScopedContainer.service])]
AsyncService = Annotated[Service, Depends(AsyncProvide[RequestScopedContainer.service])]


@inject
async def classic_async(service: ClassicService) -> dict[str, int]:
    return service.run()


@inject
def classic_sync(service: ClassicService) -> dict[str, int]:
    return service.run()


@inject
async def fastapi_provide_async(service: AsyncService) -> dict[str, int]:
    return service.run()


@inject
def fastapi_provide_sync(service: AsyncService) -> dict[str, int]:
    return service.run()


HiddenService = Annotated[Service, ClassicProvide[RequestScopedContainer.service]]


@hidden_inject
async def hidden_inject_async(service: HiddenService) -> dict[str, int]:
    return service.run()


@hidden_inject
def hidden_inject_sync(service: HiddenService) -> dict[str, int]:
    return service.run()


class InlineCommitContainer(containers.DeclarativeContainer):
    """The same, with the commit pinned to the event loop: what ``offload=False`` saves."""

    session = RequestScoped(unit_of_work, UnitOfWorkSessionLocal, offload=False)
    repository = providers.Factory(Repository, session=session)
    service = providers.Factory(Service, repository=repository, session=session)


InlineService = Annotated[Service, Depends(AsyncProvide[InlineCommitContainer.service])]


@inject
async def inline_commit_async(service: InlineService) -> dict[str, int]:
    return service.run()


@inject
def inline_commit_sync(service: InlineService) -> dict[str, int]:
    return service.run()


def request_scoped_app(async_endpoint: Any, sync_endpoint: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)
    app.get("/async")(async_endpoint)
    app.get("/sync")(sync_endpoint)
    return app


# --- the driver -------------------------------------------------------------------------------


def make_request(app: Any, path: str) -> Callable[[], Awaitable[bytes]]:
    """A coroutine function sending one GET to ``app`` and returning the body."""
    template: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"accept", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("bench", 80),
    }

    async def request() -> bytes:
        scope = {**template, "state": {}}
        body: list[bytes] = []
        status = 0
        body_sent = complete = False
        disconnected: asyncio.Future[None] | None = None

        async def receive() -> dict[str, Any]:
            nonlocal body_sent, disconnected
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if not complete:  # as a server does: wait until the client goes away
                disconnected = asyncio.get_running_loop().create_future()
                await disconnected
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, complete
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif kind == "http.response.body":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    complete = True

        await app(scope, receive, send)
        if status != 200:
            raise RuntimeError(f"{path} answered {status}: {b''.join(body)!r}")
        return b"".join(body)

    return request


async def check(name: str, request: Callable[[], Awaitable[bytes]], *, uses_session: bool) -> None:
    """Two requests, outside timing: a benchmark of a broken setup is worthless."""
    seen: list[Service] = []
    _probe.seen = seen
    try:
        bodies = [await request(), await request()]
    finally:
        _probe.seen = None
    for body in bodies:
        if json.loads(body) != {"value": 1}:
            raise AssertionError(f"{name}: unexpected body {body!r}")
    if not uses_session:
        return
    if len(seen) != 2:
        raise AssertionError(f"{name}: expected 2 services over 2 requests, saw {len(seen)}")
    for service in seen:
        if service.repository.session is not service.session:
            raise AssertionError(f"{name}: the repository and the service got different sessions")
        if service.session.in_transaction():
            raise AssertionError(f"{name}: the session's transaction was still open after the request")
    if seen[0].session is seen[1].session:
        raise AssertionError(f"{name}: two requests shared one session")


@contextlib.asynccontextmanager
async def endpoint_candidates(path: str) -> AsyncIterator[list[Candidate]]:
    """Every candidate's app, checked, as timers of ``path`` (``/async`` or ``/sync``); torn down after."""
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    SessionLocal.configure(bind=engine)
    UnitOfWorkSessionLocal.configure(bind=engine)
    context_local_container = ContextLocalContainer()
    request_scoped_container = RequestScopedContainer()
    inline_commit_container = InlineCommitContainer()
    this_module = [__name__]
    context_local_container.wire(modules=this_module)
    request_scoped_container.wire(modules=this_module)
    inline_commit_container.wire(modules=this_module)
    dishka_fastapi, dishka_container = dishka_app()

    apps: list[tuple[str, str, Any, bool]] = [
        ("bare", "no session: the floor", bare_app(), False),
        (
            "bare + RequestScopeMiddleware",
            "nothing resolved",
            bare_app(middleware=RequestScopeMiddleware),
            False,
        ),
        (
            "bare + pass-through middleware (reference)",
            "a pure ASGI middleware that only awaits the app: the cost of the layer itself",
            bare_app(middleware=PassThroughMiddleware),
            False,
        ),
        (
            "bare + minimal scope middleware (reference)",
            "a scope in the ContextVar and the status watched, nothing else: the floor for the row above",
            bare_app(middleware=MinimalScopeMiddleware),
            False,
        ),
        (
            "hand-written session (reference)",
            "no DI: the endpoint opens, commits and closes it: the floor for the rows below",
            hand_written_app(),
            True,
        ),
        ("FastAPI Depends(get_db)", "`yield` dependency", depends_app(), True),
        ("dishka", "`setup_dishka`, `FromDishka`", dishka_fastapi, True),
        ("that-depends", "`DIContextMiddleware`, `Depends(provider)`", that_depends_app(), True),
        (
            "ContextLocalSingleton + reset middleware",
            "dependency-injector `Provide`",
            context_local_app(context_local_container),
            True,
        ),
        (
            "RequestScoped + wiring.Provide",
            "`RequestScopeMiddleware`, dependency-injector's marker",
            request_scoped_app(classic_async, classic_sync),
            True,
        ),
        (
            "RequestScoped + fastapi.Provide",
            "`RequestScopeMiddleware`, `di_request_scope.fastapi.Provide`",
            request_scoped_app(fastapi_provide_async, fastapi_provide_sync),
            True,
        ),
        (
            "RequestScoped + fastapi.inject",
            "`di_request_scope.fastapi.inject`, `Annotated[Service, Provide[...]]`: no `Depends`",
            request_scoped_app(hidden_inject_async, hidden_inject_sync),
            True,
        ),
        (
            "RequestScoped + fastapi.Provide, offload=False",
            "`unit_of_work(..., offload=False)`: the commit on the event loop, as the peers do",
            request_scoped_app(inline_commit_async, inline_commit_sync),
            True,
        ),
    ]
    try:
        candidates = []
        for name, note, app, uses_session in apps:
            request = make_request(app, path)
            await check(f"{name} {path}", request, uses_session=uses_session)
            candidates.append(Candidate(name, async_timer(request), note))
        yield candidates
    finally:
        context_local_container.unwire()
        request_scoped_container.unwire()
        inline_commit_container.unwire()
        await dishka_container.close()
        engine.dispose()


async def measure_endpoint(settings: Settings) -> tuple[list[Result], list[Result]]:
    tables = []
    for path in ("/async", "/sync"):
        async with endpoint_candidates(path) as candidates:
            tables.append(await ameasure(candidates, "bare", settings))
    return tables[0], tables[1]


def run(settings: Settings) -> list[Section]:
    endpoint_settings = settings if settings.smoke else settings.scaled(5)
    async_results, sync_results = asyncio.run(measure_endpoint(endpoint_settings))
    text = (
        "µs per request through the whole FastAPI app; the endpoint gets a service and a repository sharing "
        "one session and runs one `SELECT 1` on in-memory SQLite. The ratio to `bare` is the request's "
        "total cost in units of an empty request."
    )
    return [
        Section(
            "ASGI: `async def` endpoint",
            text,
            markdown_table(async_results, "bare", endpoint_settings),
        ),
        Section(
            "ASGI: `def` endpoint (FastAPI's threadpool)",
            text + " The endpoint itself runs in FastAPI's threadpool: one thread hop for every candidate.",
            markdown_table(sync_results, "bare", endpoint_settings),
        ),
    ]
