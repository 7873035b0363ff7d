"""RequestScopeMiddleware with real apps: FastAPI, Starlette, raw ASGI, uvicorn and SQLite.

Every app here is wired with dependency-injector for real (``DeclarativeContainer``,
``RequestScoped``, ``@inject`` and ``Depends(Provide[...])``). Tests synchronise with
events and ordered event logs, never with sleeps.
"""

import asyncio
import itertools
import json
import logging
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import create_engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from di_request_scope import (
    NoRequestScopeError,
    RequestFailed,
    RequestScope,
    RequestScoped,
    RequestScopeMiddleware,
    ScopeMisuseError,
    current_scope,
)

# Bounds a wait that only a bug would make long; never used to order anything.
WAIT = 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def wire() -> Iterator[Any]:
    """Wire a container instance into this module (after the test defined its endpoints); unwire after."""
    wired: list[containers.DeclarativeContainer] = []

    def _wire(container: Any) -> Any:
        container.wire(modules=[__name__])
        wired.append(container)
        return container

    yield _wire
    for container in wired:
        container.unwire()


class BoundedClient(httpx.AsyncClient):
    """An in-process client whose requests fail, instead of hanging, if the app deadlocks."""

    async def send(self, *args: Any, **kwargs: Any) -> httpx.Response:
        with anyio.fail_after(WAIT):
            return await super().send(*args, **kwargs)


def client_for(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return BoundedClient(transport=transport, base_url="http://testserver")


# --------------------------------------------------------------------------------------------------
# Probes: request-scoped objects that record their life in an ordered event log.
# --------------------------------------------------------------------------------------------------


class Thing:
    """A request-scoped object; ``owner`` is stamped with the marker of the request that uses it."""

    serial = itertools.count(1)

    def __init__(self, name: str) -> None:
        self.name = name
        self.n = next(Thing.serial)
        self.owner: str | None = None

    def __repr__(self) -> str:
        return f"<Thing {self.name}#{self.n} owner={self.owner}>"


class Tracker:
    """What happened, in order; the failure each finalizer received; where teardown ran."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.created: list[Thing] = []
        self.failures: list[tuple[str, BaseException | None]] = []
        self.teardown_threads: list[int] = []
        self.torn_down = threading.Event()

    def _create(self, name: str) -> Thing:
        thing = Thing(name)
        self.created.append(thing)
        self.events.append(f"create {name}")
        return thing

    def _teardown(self, name: str, failure: BaseException | None) -> None:
        self.failures.append((name, failure))
        self.teardown_threads.append(threading.get_ident())
        self.events.append(f"teardown {name}")
        self.torn_down.set()

    def resource(self, name: str, **needs: Any) -> Iterator[Thing]:
        """Generator initializer: the code after ``yield`` is the teardown."""
        thing = self._create(name)
        failure: BaseException | None = None
        try:
            yield thing
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._teardown(name, failure)

    async def aresource(self, name: str) -> AsyncIterator[Thing]:
        """Async generator initializer."""
        thing = self._create(name)
        failure: BaseException | None = None
        try:
            yield thing
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._teardown(name, failure)

    def failing_resource(self, name: str) -> Iterator[Thing]:
        """Generator initializer whose teardown raises."""
        yield self._create(name)
        self.events.append(f"teardown {name}")
        raise RuntimeError(f"teardown of {name} failed")

    async def failing_aresource(self, name: str) -> AsyncIterator[Thing]:
        yield self._create(name)
        self.events.append(f"teardown {name}")
        raise RuntimeError(f"teardown of {name} failed")

    def failure_of(self, name: str) -> BaseException | None:
        found = [failure for n, failure in self.failures if n == name]
        assert len(found) == 1, f"{name} torn down {len(found)} times: {self.events}"
        return found[0]

    def count(self, event: str) -> int:
        return self.events.count(event)


class TrackedContextManager:
    """A context manager instance (like ``Session``): entered on creation, exited at teardown."""

    def __init__(self, tracker: Tracker, name: str) -> None:
        self.tracker = tracker
        self.name = name

    def __enter__(self) -> Thing:
        return self.tracker._create(self.name)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.tracker._teardown(self.name, exc)


# --------------------------------------------------------------------------------------------------
# The app of the user story (dependency-injector issue "Single Database Session Per FastAPI
# Request Lifecycle"), with Factory replaced by RequestScoped.
# --------------------------------------------------------------------------------------------------

engine = create_engine("sqlite://")
SessionLocal = sessionmaker(bind=engine)


class ApplicationContainer(containers.DeclarativeContainer):
    wiring_config = containers.WiringConfiguration(modules=[__name__])
    database = RequestScoped(SessionLocal)


seed_app = FastAPI()
seed_app.add_middleware(RequestScopeMiddleware)
# The sessions each request saw, kept alive so that id() values are never reused.
seed_sessions: list[tuple[str, Session, Session]] = []


@seed_app.get("/")
@inject
async def root(
    session_1: Session = Depends(Provide[ApplicationContainer.database]),
    session_2: Session = Depends(Provide[ApplicationContainer.database]),
) -> dict[str, int]:
    seed_sessions.append(("async", session_1, session_2))
    return {"session_1_id": id(session_1), "session_2_id": id(session_2)}


@inject
def stamp_marker(marker: str, session: Session = Depends(Provide[ApplicationContainer.database])) -> Session:
    """A sync dependency (threadpool): the first to resolve the session; stamps the request's marker."""
    session.info.setdefault("marker", marker)
    return session


@seed_app.get("/sync")
@inject
def root_sync(
    marker: str = "",
    stamped: Session = Depends(stamp_marker),
    session_1: Session = Depends(Provide[ApplicationContainer.database]),
    session_2: Session = Depends(Provide[ApplicationContainer.database]),
) -> dict[str, Any]:
    seed_sessions.append((marker, session_1, session_2))
    return {
        "session_1_id": id(session_1),
        "session_2_id": id(session_2),
        "stamped_id": id(stamped),
        "owner": session_1.info.get("marker"),
    }


@pytest.fixture
def seed_container() -> Iterator[ApplicationContainer]:
    """The story's container; instantiating it wires this module (``WiringConfiguration``)."""
    seed_sessions.clear()
    container = ApplicationContainer()
    yield container
    container.unwire()
    seed_sessions.clear()


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/", "/sync"], ids=["async-endpoint", "sync-endpoint"])
async def test_seed_app_injects_one_session_twice_and_a_new_one_per_request(
    seed_container: ApplicationContainer, path: str
) -> None:
    """Both Depends(Provide[database]) parameters get the same Session; the next request gets another."""
    async with client_for(seed_app) as client:
        first = (await client.get(path, params={"marker": "first"})).json()
        second = (await client.get(path, params={"marker": "second"})).json()

    assert first["session_1_id"] == first["session_2_id"]
    assert second["session_1_id"] == second["session_2_id"]
    assert len(seed_sessions) == 2
    (_, first_1, first_2), (_, second_1, second_2) = seed_sessions
    assert first_1 is first_2
    assert second_1 is second_2
    assert isinstance(first_1, Session)
    assert first_1 is not second_1


@pytest.mark.server
@pytest.mark.anyio
async def test_sync_endpoints_under_concurrent_load_on_uvicorn_never_share_a_session(
    seed_container: ApplicationContainer, uvicorn_server: Any
) -> None:
    """200 requests, 50 at a time, to a sync endpoint on uvicorn: one session per request, never shared."""
    total, concurrency = 200, 50
    responses: dict[str, httpx.Response] = {}
    limiter = anyio.Semaphore(concurrency)

    with uvicorn_server(seed_app) as server:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:

            async def one(marker: str) -> None:
                async with limiter:
                    responses[marker] = await client.get("/sync", params={"marker": marker})

            async with anyio.create_task_group() as tg:
                for i in range(total):
                    tg.start_soon(one, f"m{i}")

    assert len(responses) == total
    for marker, response in responses.items():
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["session_1_id"] == body["session_2_id"] == body["stamped_id"], marker
        assert body["owner"] == marker  # no other request stamped this session first
    # Every session object is still alive in seed_sessions: distinct ids mean distinct sessions.
    assert sorted(marker for marker, _, _ in seed_sessions) == sorted(responses)
    assert all(s1 is s2 for _, s1, s2 in seed_sessions)
    assert len({id(s1) for _, s1, _ in seed_sessions}) == total
    assert all(s1.info["marker"] == marker for marker, s1, _ in seed_sessions)


# --------------------------------------------------------------------------------------------------
# One instance everywhere in a request.
# --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_and_sync_endpoints_share_the_instance_with_their_async_dependency(wire: Any) -> None:
    """An async endpoint and a sync endpoint (threadpool) get the instance their async dependency got."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @inject
    async def async_dep(thing: Thing = Depends(Provide[Container.thing])) -> Thing:
        return thing

    @app.get("/async")
    @inject
    async def async_endpoint(
        dep: Thing = Depends(async_dep), thing: Thing = Depends(Provide[Container.thing])
    ) -> dict[str, Any]:
        return {"same": dep is thing, "n": thing.n}

    @app.get("/sync")
    @inject
    def sync_endpoint(
        dep: Thing = Depends(async_dep), thing: Thing = Depends(Provide[Container.thing])
    ) -> dict[str, Any]:
        return {"same": dep is thing, "n": thing.n, "thread": threading.get_ident()}

    wire(Container())
    async with client_for(app) as client:
        first = (await client.get("/async")).json()
        second = (await client.get("/sync")).json()

    assert first["same"] is True
    assert second["same"] is True
    assert second["thread"] != threading.get_ident()  # the sync endpoint really ran in the threadpool
    assert [thing.n for thing in tracker.created] == [first["n"], second["n"]]
    assert tracker.count("teardown thing") == 2


@pytest.mark.anyio
async def test_instance_first_created_in_a_sync_dependency_is_reused_by_async_dependency_and_endpoint(
    wire: Any,
) -> None:
    """Created first inside a sync dependency (worker thread), the instance is the one the rest get."""
    created_in: list[int] = []
    tracker = Tracker()

    def make_thing() -> Iterator[Thing]:
        created_in.append(threading.get_ident())
        yield from tracker.resource("thing")

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(make_thing)

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @inject
    def sync_dep(thing: Thing = Depends(Provide[Container.thing])) -> Thing:
        return thing

    @inject
    async def async_dep(thing: Thing = Depends(Provide[Container.thing])) -> Thing:
        return thing

    @app.get("/")
    @inject
    async def endpoint(
        first: Thing = Depends(sync_dep),
        second: Thing = Depends(async_dep),
        thing: Thing = Depends(Provide[Container.thing]),
    ) -> dict[str, Any]:
        return {"same": first is second is thing, "loop_thread": threading.get_ident()}

    wire(Container())
    async with client_for(app) as client:
        body = (await client.get("/")).json()

    assert body["same"] is True
    assert len(created_in) == 1
    assert created_in[0] != body["loop_thread"]  # the first resolution happened in the threadpool
    assert tracker.count("create thing") == 1
    assert tracker.count("teardown thing") == 1


class Repository:
    def __init__(self, session: Thing) -> None:
        self.session = session


class Service:
    def __init__(self, users: Repository, orders: Repository, session: Thing) -> None:
        self.users = users
        self.orders = orders
        self.session = session


@pytest.mark.anyio
async def test_factory_built_repositories_and_service_receive_the_request_session(wire: Any) -> None:
    """Factory(Repository, session=Container.db) objects are new each time but share the request's db."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(tracker.resource, "db")
        repository = providers.Factory(Repository, session=db)
        service = providers.Factory(Service, users=repository, orders=repository, session=db)

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/")
    @inject
    def endpoint(
        service: Service = Depends(Provide[Container.service]),
        repository: Repository = Depends(Provide[Container.repository]),
        db: Thing = Depends(Provide[Container.db]),
    ) -> dict[str, Any]:
        return {
            "distinct_repositories": len({id(service.users), id(service.orders), id(repository)}) == 3,
            "same_session": all(
                session is db
                for session in (
                    service.users.session,
                    service.orders.session,
                    service.session,
                    repository.session,
                )
            ),
            "n": db.n,
        }

    wire(Container())
    async with client_for(app) as client:
        first = (await client.get("/")).json()
        second = (await client.get("/")).json()

    assert first["distinct_repositories"] is True
    assert first["same_session"] is True
    assert second["same_session"] is True
    assert first["n"] != second["n"]
    assert tracker.count("create db") == 2


@pytest.mark.anyio
async def test_current_scope_is_one_open_scope_across_the_request_and_closed_afterwards(wire: Any) -> None:
    """current_scope() is the same open RequestScope in async, threadpool and background code."""
    scopes: list[tuple[str, RequestScope, bool]] = []

    def record(where: str) -> None:
        scope = current_scope()
        scopes.append((where, scope, scope.closed))

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    def sync_dep() -> None:
        record("sync dependency")

    @app.get("/")
    async def endpoint(background: BackgroundTasks, _: None = Depends(sync_dep)) -> dict[str, str]:
        record("endpoint")
        background.add_task(record, "sync background task")
        return {}

    async with client_for(app) as client:
        await client.get("/")
        await client.get("/")

    assert [where for where, _, _ in scopes] == ["sync dependency", "endpoint", "sync background task"] * 2
    assert not any(closed for _, _, closed in scopes)
    first, second = {id(s) for _, s, _ in scopes[:3]}, {id(s) for _, s, _ in scopes[3:]}
    assert len(first) == len(second) == 1
    assert scopes[0][1] is not scopes[3][1]
    assert scopes[0][1].closed
    assert scopes[3][1].closed


@pytest.mark.anyio
@pytest.mark.parametrize("body_kind", ["sync-generator", "async-generator"])
async def test_teardown_waits_for_the_streaming_body_and_background_tasks_which_share_the_instance(
    wire: Any, body_kind: str
) -> None:
    """The streaming body and background tasks see the request's instance; teardown comes after them."""
    tracker = Tracker()
    same: list[bool] = []

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    def get_thing(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/stream")
    @inject
    async def stream(
        background: BackgroundTasks, thing: Thing = Depends(Provide[Container.thing])
    ) -> StreamingResponse:
        def sync_body() -> Iterator[bytes]:
            for i in (1, 2):
                same.append(get_thing() is thing)
                tracker.events.append(f"body {i}")
                yield f"chunk {i}\n".encode()

        async def async_body() -> AsyncIterator[bytes]:
            for i in (1, 2):
                same.append(get_thing() is thing)
                tracker.events.append(f"body {i}")
                yield f"chunk {i}\n".encode()

        def sync_task() -> None:
            same.append(get_thing() is thing)
            tracker.events.append("sync background task")

        async def async_task() -> None:
            same.append(get_thing() is thing)
            tracker.events.append("async background task")

        background.add_task(sync_task)
        background.add_task(async_task)
        body = sync_body() if body_kind == "sync-generator" else async_body()
        return StreamingResponse(body, media_type="text/plain")

    wire(Container())
    async with client_for(app) as client:
        response = await client.get("/stream")

    assert response.text == "chunk 1\nchunk 2\n"
    assert same == [True, True, True, True]
    assert tracker.events == [
        "create thing",
        "body 1",
        "body 2",
        "sync background task",
        "async background task",
        "teardown thing",
    ]
    assert tracker.failure_of("thing") is None


@pytest.mark.anyio
async def test_websocket_connection_has_one_instance_distinct_from_other_connections(wire: Any) -> None:
    """A WebSocket connection is one scope: one instance for all its messages, torn down on close."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    def get_thing(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.websocket("/ws")
    @inject
    async def ws(websocket: WebSocket, thing: Thing = Depends(Provide[Container.thing])) -> None:
        await websocket.accept()
        while (message := await websocket.receive_text()) != "bye":
            await websocket.send_json({"message": message, "n": thing.n, "same": get_thing() is thing})
        await websocket.close()

    wire(Container())
    replies: list[list[dict[str, Any]]] = []
    teardowns_after_close: list[int] = []
    with TestClient(app) as client:
        for _ in range(2):
            with client.websocket_connect("/ws") as websocket:
                websocket.send_text("one")
                first = websocket.receive_json()
                websocket.send_text("two")
                second = websocket.receive_json()
                assert tracker.count("teardown thing") == len(replies)  # still open
                websocket.send_text("bye")
                with pytest.raises(WebSocketDisconnect):
                    websocket.receive_text()
            replies.append([first, second])
            teardowns_after_close.append(tracker.count("teardown thing"))

    (a1, a2), (b1, b2) = replies
    assert [a1["same"], a2["same"], b1["same"], b2["same"]] == [True] * 4
    assert a1["n"] == a2["n"]
    assert b1["n"] == b2["n"]
    assert a1["n"] != b1["n"]
    assert teardowns_after_close == [1, 2]
    assert [failure for _, failure in tracker.failures] == [None, None]


def test_websocket_closed_with_an_error_code_hands_a_failure_to_finalizers(wire: Any) -> None:
    """Closing a WebSocket with code 1011 makes the finalizer receive RequestFailed; 1000 does not."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.websocket("/ws/{code}")
    @inject
    async def ws(websocket: WebSocket, code: int, thing: Thing = Depends(Provide[Container.thing])) -> None:
        await websocket.accept()
        await websocket.close(code=code)

    wire(Container())
    with TestClient(app) as client:
        for code in (1000, 1011):
            with client.websocket_connect(f"/ws/{code}") as websocket, pytest.raises(WebSocketDisconnect):
                websocket.receive_text()

    (_, normal), (_, error) = tracker.failures
    assert normal is None
    assert isinstance(error, RequestFailed)
    assert "1011" in str(error)


def test_websocket_denial_response_with_an_error_status_hands_a_failure_to_finalizers(wire: Any) -> None:
    """A WebSocket denied with an HTTP 403 (websocket.http.response) is a failed scope."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.websocket("/ws")
    @inject
    async def ws(websocket: WebSocket, thing: Thing = Depends(Provide[Container.thing])) -> None:
        await websocket.send_denial_response(JSONResponse({"detail": "forbidden"}, status_code=403))

    wire(Container())
    with TestClient(app) as client, pytest.raises(WebSocketDenialResponse) as denied:  # noqa: SIM117
        with client.websocket_connect("/ws"):
            pass

    assert denied.value.status_code == 403
    failure = tracker.failure_of("thing")
    assert isinstance(failure, RequestFailed)
    assert failure.status_code == 403


@pytest.mark.anyio
async def test_base_http_middleware_inside_the_scope_shares_the_instance_and_teardown_waits(
    wire: Any,
) -> None:
    """A BaseHTTPMiddleware inside the scope, the endpoint and a background task share one instance."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    def get_thing(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    app = FastAPI()

    @app.middleware("http")
    async def stamp_header(request: Request, call_next: Any) -> Any:
        thing = get_thing()
        tracker.events.append("dispatch")
        response = await call_next(request)
        response.headers["x-thing"] = str(thing.n)
        return response

    app.add_middleware(RequestScopeMiddleware)  # added last: outside the BaseHTTPMiddleware

    @app.get("/")
    @inject
    async def endpoint(
        background: BackgroundTasks, thing: Thing = Depends(Provide[Container.thing])
    ) -> dict[str, Any]:
        def task() -> None:
            tracker.events.append(f"background same={get_thing() is thing}")

        background.add_task(task)
        return {"n": thing.n}

    wire(Container())
    async with client_for(app) as client:
        response = await client.get("/")

    assert response.headers["x-thing"] == str(response.json()["n"])
    assert tracker.events == ["create thing", "dispatch", "background same=True", "teardown thing"]
    assert tracker.failure_of("thing") is None


@pytest.mark.anyio
async def test_starlette_app_with_inject_defaults_shares_one_instance(wire: Any) -> None:
    """A plain Starlette app (Middleware list, Provide defaults) gets one instance per request."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    async def async_endpoint(
        request: StarletteRequest,
        thing: Thing = Provide[Container.thing],
        again: Thing = Provide[Container.thing],
    ) -> StarletteJSONResponse:
        return StarletteJSONResponse({"same": thing is again, "n": thing.n})

    @inject
    def sync_endpoint(
        request: StarletteRequest,
        thing: Thing = Provide[Container.thing],
        again: Thing = Provide[Container.thing],
    ) -> StarletteJSONResponse:
        return StarletteJSONResponse({"same": thing is again, "n": thing.n})

    app = Starlette(
        routes=[Route("/async", async_endpoint), Route("/sync", sync_endpoint)],
        middleware=[Middleware(RequestScopeMiddleware)],
    )
    wire(Container())
    async with client_for(app) as client:
        bodies = [(await client.get(path)).json() for path in ("/async", "/sync", "/async")]

    assert all(body["same"] for body in bodies)
    assert len({body["n"] for body in bodies}) == 3
    assert tracker.count("teardown thing") == 3


@pytest.mark.anyio
async def test_raw_asgi_app_wrapped_in_the_middleware_shares_one_instance(wire: Any) -> None:
    """A raw ASGI callable wrapped in RequestScopeMiddleware resolves one instance per request."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    async def handle(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    container = wire(Container())

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        thing = await handle()
        body = json.dumps({"same": container.thing() is thing, "n": thing.n}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async with client_for(RequestScopeMiddleware(raw_app)) as client:
        first = (await client.get("/")).json()
        second = (await client.get("/")).json()

    assert first["same"] is True
    assert second["same"] is True
    assert first["n"] != second["n"]
    assert tracker.events == ["create thing", "teardown thing"] * 2
    assert [failure for _, failure in tracker.failures] == [None, None]


# --------------------------------------------------------------------------------------------------
# Laziness and teardown.
# --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_request_that_never_resolves_creates_nothing(wire: Any) -> None:
    """Instances are created lazily: a request that never resolves one creates (and tears down) none."""
    calls: list[str] = []

    def make_thing(name: str) -> Thing:
        calls.append(name)
        return Thing(name)

    class Container(containers.DeclarativeContainer):
        used = RequestScoped(make_thing, "used")
        unused = RequestScoped(make_thing, "unused")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/nothing")
    async def nothing() -> dict[str, str]:
        return {}

    @app.get("/used")
    @inject
    async def used(thing: Thing = Depends(Provide[Container.used])) -> dict[str, str]:
        return {}

    wire(Container())
    async with client_for(app) as client:
        assert (await client.get("/nothing")).status_code == 200
        assert calls == []
        assert (await client.get("/used")).status_code == 200

    assert calls == ["used"]


@pytest.mark.anyio
async def test_teardown_runs_in_reverse_creation_order(wire: Any) -> None:
    """Sync, async and context-manager instances are torn down in reverse order of creation."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        a = RequestScoped(tracker.resource, "a")
        b = RequestScoped(tracker.aresource, "b")
        c = RequestScoped(TrackedContextManager, tracker, "c")
        e = RequestScoped(tracker.resource, "e")
        d = RequestScoped(tracker.resource, "d", needs=e)  # creates e while creating d

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/")
    @inject
    async def endpoint(a: Thing = Depends(Provide[Container.a])) -> dict[str, str]:
        await container.b()
        container.c()
        container.d()
        container.a()  # already created: no new creation, no move in the order
        return {}

    container = wire(Container())
    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 200

    assert tracker.events == [
        "create a",
        "create b",
        "create c",
        "create e",
        "create d",
        "teardown d",
        "teardown e",
        "teardown c",
        "teardown b",
        "teardown a",
    ]


@pytest.mark.anyio
async def test_sync_finalizers_run_in_a_worker_thread_not_on_the_event_loop(wire: Any) -> None:
    """Blocking teardown (Session.close()) runs off the event loop thread."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")
        cm = RequestScoped(TrackedContextManager, tracker, "cm")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/")
    @inject
    async def endpoint(
        thing: Thing = Depends(Provide[Container.thing]), cm: Thing = Depends(Provide[Container.cm])
    ) -> dict[str, str]:
        return {}

    wire(Container())
    async with client_for(app) as client:
        await client.get("/")

    assert len(tracker.teardown_threads) == 2
    assert threading.get_ident() not in tracker.teardown_threads


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    marker: Mapped[str]


class ConflictError(Exception):
    pass


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[tuple[Any, str]]:
    """A real SQLite file with an ``items`` table: (engine, path for a separate connection)."""
    db_engine = create_engine(sqlite_url)
    Base.metadata.create_all(db_engine)
    yield db_engine, str(make_url(sqlite_url).database)
    db_engine.dispose()


def markers_in(path: str) -> list[str]:
    """What is committed, read with a separate sqlite3 connection."""
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT marker FROM items ORDER BY id").fetchall()
    connection.close()
    return [marker for (marker,) in rows]


def transactional_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """The usual unit of work: commit when the request succeeded, roll back when it failed."""
    with factory() as session, session.begin():
        yield session


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("outcome", "status", "committed"),
    [
        ("ok", 200, True),
        ("raise", 500, False),
        ("http_exception_404", 404, False),
        ("handled_409", 409, False),
        ("returned_422", 422, False),
    ],
)
async def test_sqlite_unit_of_work_commits_a_successful_request_and_rolls_back_a_failed_one(
    wire: Any, sqlite_db: tuple[Any, str], outcome: str, status: int, committed: bool
) -> None:
    """A generator `with factory() as s, s.begin(): yield s` commits on success, rolls back otherwise."""
    db_engine, path = sqlite_db

    class Container(containers.DeclarativeContainer):
        engine = providers.Object(db_engine)
        session_factory = providers.Singleton(sessionmaker, bind=engine)
        session = RequestScoped(transactional_session, session_factory)

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.exception_handler(ConflictError)
    async def conflict_handler(request: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": "conflict"}, status_code=409)

    @app.post("/items/{outcome}")
    @inject
    def create_item(outcome: str, session: Session = Depends(Provide[Container.session])) -> Any:
        session.add(Item(marker=outcome))
        session.flush()  # the row is written inside the request's transaction
        if outcome == "raise":
            raise RuntimeError("the endpoint failed")
        if outcome == "http_exception_404":
            raise HTTPException(status_code=404)
        if outcome == "handled_409":
            raise ConflictError()
        if outcome == "returned_422":
            return JSONResponse({"detail": "invalid"}, status_code=422)
        return {"ok": True}

    wire(Container())
    async with client_for(app, raise_app_exceptions=False) as client:
        response = await client.post(f"/items/{outcome}")

    assert response.status_code == status
    assert markers_in(path) == ([outcome] if committed else [])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("outcome", "status"),
    [("ok", 200), ("http_exception_404", 404), ("handled_409", 409), ("returned_422", 422), ("raise", 500)],
)
async def test_finalizer_receives_the_request_outcome(wire: Any, outcome: str, status: int) -> None:
    """Finalizers get None on success, RequestFailed(status_code) for error statuses, the app's exception."""
    tracker = Tracker()
    raised: list[BaseException] = []

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.exception_handler(ConflictError)
    async def conflict_handler(request: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": "conflict"}, status_code=409)

    @app.get("/{outcome}")
    @inject
    async def endpoint(outcome: str, thing: Thing = Depends(Provide[Container.thing])) -> Any:
        if outcome == "raise":
            raised.append(RuntimeError("the endpoint failed"))
            raise raised[0]
        if outcome == "http_exception_404":
            raise HTTPException(status_code=404)
        if outcome == "handled_409":
            raise ConflictError()
        if outcome == "returned_422":
            return JSONResponse({}, status_code=422)
        return {}

    wire(Container())
    async with client_for(app, raise_app_exceptions=False) as client:
        response = await client.get(f"/{outcome}")

    assert response.status_code == status
    failure = tracker.failure_of("thing")
    if outcome == "ok":
        assert failure is None
    elif outcome == "raise":
        assert failure is raised[0]
    else:
        assert isinstance(failure, RequestFailed)
        assert failure.status_code == status


@pytest.mark.anyio
async def test_background_task_that_raises_after_the_response_hands_its_error_to_finalizers(
    wire: Any,
) -> None:
    """The client already has its 200, but a failing background task still reaches the finalizer."""
    tracker = Tracker()
    task_error = RuntimeError("the background task failed")

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    def failing_task() -> None:
        tracker.events.append("background task")
        raise task_error

    @app.get("/")
    @inject
    async def endpoint(
        background: BackgroundTasks, thing: Thing = Depends(Provide[Container.thing])
    ) -> dict[str, str]:
        background.add_task(failing_task)
        return {"status": "accepted"}

    wire(Container())
    client = RawClient()
    with pytest.raises(RuntimeError, match="the background task failed"):
        await client.run(app, http_scope("/"))

    assert client.statuses == [200]
    assert tracker.events == ["create thing", "background task", "teardown thing"]
    assert tracker.failure_of("thing") is task_error


@pytest.mark.anyio
async def test_custom_is_failure_status_decides_which_statuses_roll_back(
    wire: Any, sqlite_db: tuple[Any, str]
) -> None:
    """With is_failure_status=lambda s: s >= 500, a 404 commits and a returned 503 rolls back."""
    db_engine, path = sqlite_db
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        engine = providers.Object(db_engine)
        session_factory = providers.Singleton(sessionmaker, bind=engine)
        session = RequestScoped(transactional_session, session_factory)
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware, is_failure_status=lambda status: status >= 500)

    @app.post("/items/{status}")
    @inject
    def create_item(
        status: int,
        session: Session = Depends(Provide[Container.session]),
        thing: Thing = Depends(Provide[Container.thing]),
    ) -> JSONResponse:
        session.add(Item(marker=str(status)))
        return JSONResponse({}, status_code=status)

    wire(Container())
    async with client_for(app) as client:
        assert (await client.post("/items/404")).status_code == 404
        assert (await client.post("/items/503")).status_code == 503

    assert markers_in(path) == ["404"]
    (_, not_found), (_, unavailable) = tracker.failures
    assert not_found is None
    assert isinstance(unavailable, RequestFailed)
    assert unavailable.status_code == 503


# --------------------------------------------------------------------------------------------------
# Cancellation and client disconnects.
# --------------------------------------------------------------------------------------------------


def http_scope(path: str, method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }


class RawClient:
    """Drives one HTTP request through an ASGI app with raw receive/send; records what was sent.

    Like uvicorn: ``receive()`` returns the request body, then blocks until the response
    completed and returns ``http.disconnect``; once the client is ``gone`` it returns
    ``http.disconnect`` at once, even when the body was never read.
    """

    def __init__(self, on_send: Any = None, *, body: bytes = b"", gone: bool = False) -> None:
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.on_send = on_send
        self.body = body
        self.gone = gone
        self._request_sent = False
        self._response_done = anyio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.gone:
            message = {"type": "http.disconnect"}
        elif not self._request_sent:
            self._request_sent = True
            message = {"type": "http.request", "body": self.body, "more_body": False}
        else:
            await self._response_done.wait()
            message = {"type": "http.disconnect"}
        self.received.append(message)
        return message

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if self.on_send is not None:
            self.on_send(message)
        if message["type"] == "http.response.pathsend" or (
            message["type"] == "http.response.body" and not message.get("more_body", False)
        ):
            self._response_done.set()

    async def run(self, app: Any, scope: dict[str, Any]) -> None:
        """Call the app to completion; a bug that deadlocks it fails the test instead of hanging it."""
        with anyio.fail_after(WAIT):
            await app(scope, self.receive, self.send)

    @property
    def statuses(self) -> list[int]:
        return [m["status"] for m in self.sent if m["type"] == "http.response.start"]


def cancellable_app(tracker: Tracker, wire: Any) -> tuple[FastAPI, asyncio.Event]:
    """An app whose endpoint holds the instance and waits forever; returns it and its 'entered' event."""

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    entered = asyncio.Event()
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/wait")
    @inject
    async def wait_forever(thing: Thing = Depends(Provide[Container.thing])) -> dict[str, str]:
        entered.set()
        await asyncio.Event().wait()
        return {}

    wire(Container())
    return app, entered


@pytest.mark.anyio
async def test_cancelled_request_is_torn_down_and_its_finalizer_receives_the_cancellation(wire: Any) -> None:
    """Cancelling the request's task mid-endpoint still tears the instance down, with the CancelledError."""
    tracker = Tracker()
    app, entered = cancellable_app(tracker, wire)
    client = RawClient()

    task = asyncio.ensure_future(app(http_scope("/wait"), client.receive, client.send))
    with anyio.fail_after(WAIT):
        await entered.wait()
    assert tracker.events == ["create thing"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert tracker.events == ["create thing", "teardown thing"]
    assert isinstance(tracker.failure_of("thing"), asyncio.CancelledError)
    assert client.sent == []


@pytest.mark.anyio
async def test_teardown_is_shielded_when_an_anyio_cancel_scope_cancels_the_request(wire: Any) -> None:
    """A cancelled anyio scope (level-triggered) does not stop teardown from running to the end."""
    tracker = Tracker()
    app, entered = cancellable_app(tracker, wire)
    client = RawClient()

    async with anyio.create_task_group() as tg:
        tg.start_soon(app, http_scope("/wait"), client.receive, client.send)
        with anyio.fail_after(WAIT):
            await entered.wait()
        tg.cancel_scope.cancel()

    assert tracker.events == ["create thing", "teardown thing"]
    failure = tracker.failure_of("thing")
    assert isinstance(failure, anyio.get_cancelled_exc_class())


@pytest.mark.anyio
async def test_app_returning_without_completing_the_response_is_a_failure(wire: Any) -> None:
    """A raw app that returns with more_body still pending hands RequestFailed to the finalizer."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    def use_thing(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        use_thing()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})

    wire(Container())
    client = RawClient()
    await client.run(RequestScopeMiddleware(raw_app), http_scope("/"))

    failure = tracker.failure_of("thing")
    assert isinstance(failure, RequestFailed)
    assert "without completing" in str(failure)


@pytest.mark.anyio
async def test_file_response_sent_with_pathsend_counts_as_complete(wire: Any, tmp_path: Any) -> None:
    """A FileResponse sent as http.response.pathsend is a complete, successful response."""
    tracker = Tracker()
    path = tmp_path / "report.txt"
    path.write_text("report")

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/report")
    @inject
    async def report(thing: Thing = Depends(Provide[Container.thing])) -> FileResponse:
        return FileResponse(path)

    wire(Container())
    client = RawClient()
    scope = {**http_scope("/report"), "extensions": {"http.response.pathsend": {}}}
    await client.run(app, scope)

    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.pathsend"]
    assert tracker.failure_of("thing") is None


@pytest.mark.server
def test_client_disconnect_mid_stream_on_uvicorn_tears_down_with_a_failure(
    wire: Any, uvicorn_server: Any
) -> None:
    """A client that closes its socket mid-stream: teardown still runs and the finalizer gets a failure."""
    tracker = Tracker()
    body_cancelled = threading.Event()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/stream")
    @inject
    async def stream(thing: Thing = Depends(Provide[Container.thing])) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first-chunk\n"
            try:
                await anyio.Event().wait()  # never set: only the disconnect ends this body
            finally:
                body_cancelled.set()
            yield b"never sent\n"

        return StreamingResponse(body(), media_type="text/plain")

    wire(Container())
    with uvicorn_server(app) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            received = b""
            while b"first-chunk" not in received:
                chunk = sock.recv(4096)
                assert chunk, f"the server closed the connection early: {received!r}"
                received += chunk
            assert tracker.events == ["create thing"]
        # The socket is closed: the server notices, the body is cancelled, the scope closes.
        assert tracker.torn_down.wait(WAIT), tracker.events
        assert body_cancelled.is_set()

    assert received.startswith(b"HTTP/1.1 200")
    assert tracker.events == ["create thing", "teardown thing"]
    failure = tracker.failure_of("thing")
    assert isinstance(failure, RequestFailed)
    assert "disconnected" in str(failure)


# --------------------------------------------------------------------------------------------------
# Teardown errors.
# --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_finalizer_runs_when_some_raise_and_the_errors_are_logged(
    wire: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A raising finalizer (sync or async) does not stop the others; errors are logged, not raised."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        a = RequestScoped(tracker.resource, "a")
        b = RequestScoped(tracker.failing_resource, "b")
        c = RequestScoped(tracker.failing_aresource, "c")
        d = RequestScoped(tracker.resource, "d")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/")
    @inject
    async def endpoint(
        a: Thing = Depends(Provide[Container.a]), b: Thing = Depends(Provide[Container.b])
    ) -> dict[str, str]:
        await container.c()
        container.d()
        return {"status": "created"}

    container = wire(Container())
    caplog.set_level(logging.ERROR, logger="di_request_scope")
    async with client_for(app) as client:
        response = await client.get("/")

    assert response.status_code == 200
    assert response.json() == {"status": "created"}
    assert [e for e in tracker.events if e.startswith("teardown")] == [
        "teardown d",
        "teardown c",
        "teardown b",
        "teardown a",
    ]
    assert tracker.failure_of("a") is None
    assert tracker.failure_of("d") is None
    records = [r for r in caplog.records if r.name == "di_request_scope"]
    assert [r.levelno for r in records] == [logging.ERROR, logging.ERROR]
    logged = [str(r.exc_info[1]) for r in records if r.exc_info]
    assert logged == ["teardown of c failed", "teardown of b failed"]


# --------------------------------------------------------------------------------------------------
# Hooks that run before a successful response starts.
# --------------------------------------------------------------------------------------------------


def unit_of_work(factory: sessionmaker[Session], failures: list[BaseException | None]) -> Iterator[Session]:
    """Commits in a before-response hook (a failed commit can still become a 5xx); records the outcome."""
    with factory() as session:
        current_scope().call_before_response(session.commit)
        try:
            yield session
        except BaseException as exc:
            failures.append(exc)
            raise
        failures.append(None)


@pytest.mark.anyio
async def test_before_response_hook_commits_before_the_status_is_sent(
    wire: Any, sqlite_db: tuple[Any, str]
) -> None:
    """When the client receives http.response.start, the hook has run: the row is already committed."""
    db_engine, path = sqlite_db
    failures: list[BaseException | None] = []
    events: list[str] = []

    class Container(containers.DeclarativeContainer):
        engine = providers.Object(db_engine)
        session_factory = providers.Singleton(sessionmaker, bind=engine)
        session = RequestScoped(unit_of_work, session_factory, failures)

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/items", status_code=201)
    @inject
    async def create_item(session: Session = Depends(Provide[Container.session])) -> dict[str, str]:
        session.add(Item(marker="created"))
        current_scope().call_before_response(lambda: events.append("second hook"))
        events.append("endpoint returned")
        return {"marker": "created"}

    def on_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            events.append(f"status {message['status']} sent; committed={markers_in(path)}")

    wire(Container())
    client = RawClient(on_send)
    await client.run(app, http_scope("/items", "POST"))

    assert events == ["endpoint returned", "second hook", "status 201 sent; committed=['created']"]
    assert client.statuses == [201]
    assert failures == [None]


class NewItem(BaseModel):
    marker: str


@pytest.mark.server
def test_on_uvicorn_the_commit_is_visible_once_the_status_line_arrives(
    wire: Any, sqlite_db: tuple[Any, str], uvicorn_server: Any
) -> None:
    """On uvicorn, a client holding only the 200 status line and headers finds the row committed."""
    db_engine, path = sqlite_db
    failures: list[BaseException | None] = []
    release_body = threading.Event()
    torn_down = threading.Event()

    def session_then_signal(factory: sessionmaker[Session]) -> Iterator[Session]:
        try:
            yield from unit_of_work(factory, failures)
        finally:
            torn_down.set()

    class Container(containers.DeclarativeContainer):
        engine = providers.Object(db_engine)
        session_factory = providers.Singleton(sessionmaker, bind=engine)
        session = RequestScoped(session_then_signal, session_factory)

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/items")
    @inject
    def create_item(
        item: NewItem, session: Session = Depends(Provide[Container.session])
    ) -> StreamingResponse:
        session.add(Item(marker=item.marker))

        async def body() -> AsyncIterator[bytes]:
            await anyio.to_thread.run_sync(release_body.wait, WAIT)  # no body byte before the check
            yield b"done\n"

        return StreamingResponse(body(), media_type="text/plain")

    wire(Container())
    payload = json.dumps({"marker": "visible"}).encode()
    request = (
        b"POST /items HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
    ) + payload
    with (
        uvicorn_server(app) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock,
    ):
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:  # the status line and headers, nothing more
            chunk = sock.recv(4096)
            assert chunk, f"the server closed the connection early: {received!r}"
            received += chunk
        committed_when_status_arrived = markers_in(path)
        release_body.set()
        while chunk := sock.recv(4096):
            received += chunk
        assert torn_down.wait(WAIT)

    assert received.startswith(b"HTTP/1.1 200")
    assert b"done" in received
    assert committed_when_status_arrived == ["visible"]
    assert failures == [None]
    assert markers_in(path) == ["visible"]


@pytest.mark.anyio
async def test_failing_before_response_hook_turns_the_response_into_a_500_and_rolls_back(
    wire: Any, sqlite_db: tuple[Any, str]
) -> None:
    """A commit that fails in the hook makes the client get a 500, never a 2xx; the finalizer sees why."""
    db_engine, path = sqlite_db
    failures: list[BaseException | None] = []
    with Session(db_engine) as setup, setup.begin():
        setup.add(Item(id=1, marker="existing"))

    class Container(containers.DeclarativeContainer):
        engine = providers.Object(db_engine)
        session_factory = providers.Singleton(sessionmaker, bind=engine)
        session = RequestScoped(unit_of_work, session_factory, failures)

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/items", status_code=201)
    @inject
    def create_item(session: Session = Depends(Provide[Container.session])) -> dict[str, str]:
        session.add(Item(id=1, marker="duplicate"))  # flushed by the commit: IntegrityError there
        session.add(Item(id=2, marker="second"))
        return {"marker": "duplicate"}

    wire(Container())
    async with client_for(app, raise_app_exceptions=False) as client:
        response = await client.post("/items")
    client_raw = RawClient()
    with pytest.raises(IntegrityError):
        await client_raw.run(app, http_scope("/items", "POST"))

    assert response.status_code == 500
    assert client_raw.statuses == [500]
    assert len(failures) == 2
    assert all(isinstance(failure, IntegrityError) for failure in failures)
    assert markers_in(path) == ["existing"]


@pytest.mark.anyio
async def test_hook_error_is_raised_into_a_raw_app_instead_of_sending_the_status(wire: Any) -> None:
    """In a raw ASGI app, send(start 200) raises the hook's error; the app may answer 503 instead."""
    tracker = Tracker()
    seen_by_app: list[BaseException] = []
    hook_error = RuntimeError("commit failed")

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    def use_thing(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    def failing_hook() -> None:
        raise hook_error

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        use_thing()
        current_scope().call_before_response(failing_hook)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        except RuntimeError as exc:
            seen_by_app.append(exc)
            await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    wire(Container())
    async with client_for(RequestScopeMiddleware(raw_app)) as client:
        response = await client.get("/")

    assert response.status_code == 503
    assert seen_by_app == [hook_error]
    assert tracker.failure_of("thing") is hook_error  # the first failure wins over the 503


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", ["returned_400", "http_exception_404", "raise"])
async def test_before_response_hooks_do_not_run_for_error_statuses(wire: Any, outcome: str) -> None:
    """Hooks registered by a request that ends with an error status or an exception never run."""
    tracker = Tracker()
    hooks_run: list[str] = []

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/{outcome}")
    @inject
    async def endpoint(outcome: str, thing: Thing = Depends(Provide[Container.thing])) -> Any:
        current_scope().call_before_response(lambda: hooks_run.append("sync hook"))

        async def async_hook() -> None:
            hooks_run.append("async hook")

        current_scope().call_before_response(async_hook)
        if outcome == "returned_400":
            return JSONResponse({}, status_code=400)
        if outcome == "http_exception_404":
            raise HTTPException(status_code=404)
        raise RuntimeError("the endpoint failed")

    wire(Container())
    async with client_for(app, raise_app_exceptions=False) as client:
        response = await client.get(f"/{outcome}")

    assert response.status_code == {"returned_400": 400, "http_exception_404": 404, "raise": 500}[outcome]
    assert hooks_run == []
    assert tracker.failure_of("thing") is not None


@pytest.mark.anyio
async def test_before_response_hooks_run_in_registration_order_sync_and_async(wire: Any) -> None:
    """Sync and async hooks run once each, in registration order, before a successful start."""
    events: list[str] = []
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/")
    async def endpoint() -> dict[str, str]:
        async def async_hook() -> None:
            events.append("async hook")

        current_scope().call_before_response(lambda: events.append("sync hook 1"))
        current_scope().call_before_response(async_hook)
        current_scope().call_before_response(lambda: events.append("sync hook 2"))
        return {}

    client = RawClient(lambda m: events.append(m["type"]))
    await client.run(app, http_scope("/"))

    assert events == [
        "sync hook 1",
        "async hook",
        "sync hook 2",
        "http.response.start",
        "http.response.body",
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("registered_by", ["sync hook", "async hook"])
async def test_hooks_registered_while_hooks_run_also_run_before_the_status(
    wire: Any, registered_by: str
) -> None:
    """A hook added by a running hook (or while one is awaited) runs before the status too, not never."""
    events: list[str] = []
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    def late_hook() -> None:
        events.append("late hook")

    def sync_hook() -> None:
        events.append("sync hook")
        current_scope().call_before_response(late_hook)

    async def async_hook() -> None:
        events.append("async hook")
        await asyncio.sleep(0)  # registered while the middleware awaits this hook
        current_scope().call_before_response(late_hook)

    @app.get("/")
    async def endpoint() -> dict[str, str]:
        current_scope().call_before_response(sync_hook if registered_by == "sync hook" else async_hook)
        return {}

    client = RawClient(lambda m: events.append(m["type"]))
    await client.run(app, http_scope("/"))

    assert events == [registered_by, "late hook", "http.response.start", "http.response.body"]


@pytest.mark.anyio
async def test_client_gone_before_the_response_starts_skips_the_commit_hook_and_rolls_back(
    wire: Any, sqlite_db: tuple[Any, str]
) -> None:
    """If the client already left when a 2xx starts, hooks do not commit and finalizers see why."""
    db_engine, path = sqlite_db
    failures: list[BaseException | None] = []

    class Container(containers.DeclarativeContainer):
        engine = providers.Object(db_engine)
        session_factory = providers.Singleton(sessionmaker, bind=engine)
        session = RequestScoped(unit_of_work, session_factory, failures)

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/items", status_code=201)
    @inject
    async def create_item(session: Session = Depends(Provide[Container.session])) -> dict[str, str]:
        session.add(Item(marker="nobody is listening"))
        return {}

    wire(Container())
    client = RawClient(gone=True)
    await client.run(app, http_scope("/items", "POST"))

    assert markers_in(path) == []
    (failure,) = failures
    assert isinstance(failure, RequestFailed)
    assert "disconnected" in str(failure)


@pytest.mark.anyio
async def test_looking_for_a_gone_client_before_hooks_does_not_lose_the_request_body(wire: Any) -> None:
    """The middleware's check for a departed client hands the unread request body on to the app."""
    tracker = Tracker()
    hooks: list[str] = []
    read: list[dict[str, Any]] = []

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    def use_thing(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        use_thing()
        current_scope().call_before_response(lambda: hooks.append("hook"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        read.append(await receive())  # the body is read only after the response started
        await send({"type": "http.response.body", "body": b"ok"})

    wire(Container())
    client = RawClient(body=b"payload")
    await client.run(RequestScopeMiddleware(raw_app), http_scope("/", "POST"))

    assert hooks == ["hook"]
    assert read == [{"type": "http.request", "body": b"payload", "more_body": False}]
    assert tracker.failure_of("thing") is None


# --------------------------------------------------------------------------------------------------
# Stacking, lifespan.
# --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_middleware_added_twice_opens_a_single_scope(wire: Any) -> None:
    """With two copies of the middleware, code between them and the endpoint share one instance."""
    tracker = Tracker()
    between: list[Thing] = []

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    def get_thing(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    class ResolvingMiddleware:
        """Pure ASGI middleware that resolves the instance before the inner copy runs."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                between.append(get_thing())
            await self.app(scope, receive, send)

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)  # inner copy
    app.add_middleware(ResolvingMiddleware)
    app.add_middleware(RequestScopeMiddleware)  # outer copy

    @app.get("/")
    @inject
    async def endpoint(thing: Thing = Depends(Provide[Container.thing])) -> dict[str, Any]:
        return {"n": thing.n, "same": thing is between[-1]}

    wire(Container())
    async with client_for(app) as client:
        body = (await client.get("/")).json()

    assert body["same"] is True
    assert tracker.events == ["create thing", "teardown thing"]


@pytest.mark.anyio
async def test_mounted_sub_application_with_its_own_middleware_joins_the_parent_scope(wire: Any) -> None:
    """A sub-app mounted under a parent app, both with the middleware, shares the parent's scope."""
    tracker = Tracker()
    seen_by_parent: list[Thing] = []

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    def get_thing(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    sub_app = FastAPI()
    sub_app.add_middleware(RequestScopeMiddleware)

    @sub_app.get("/thing")
    @inject
    async def sub_endpoint(thing: Thing = Depends(Provide[Container.thing])) -> dict[str, Any]:
        return {"same": thing is seen_by_parent[-1]}

    app = FastAPI()

    @app.middleware("http")
    async def resolve_first(request: Request, call_next: Any) -> Any:
        seen_by_parent.append(get_thing())
        return await call_next(request)

    app.add_middleware(RequestScopeMiddleware)
    app.mount("/sub", sub_app)

    wire(Container())
    async with client_for(app) as client:
        body = (await client.get("/sub/thing")).json()

    assert body == {"same": True}
    assert tracker.events == ["create thing", "teardown thing"]


@pytest.mark.anyio
async def test_lifespan_messages_pass_through_untouched_and_open_no_scope() -> None:
    """A lifespan scope reaches the app with the server's own receive/send and no request scope."""
    seen: list[Any] = []

    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        try:
            current_scope()
        except NoRequestScopeError as exc:
            seen.append(exc)
        seen.extend([scope, receive, send])

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await RequestScopeMiddleware(raw_app)(scope, receive, send)

    error, passed_scope, passed_receive, passed_send = seen
    assert isinstance(error, NoRequestScopeError)
    assert passed_scope is scope
    assert passed_receive is receive
    assert passed_send is send
    assert scope == {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}


def test_fastapi_app_with_a_lifespan_works_behind_the_middleware(wire: Any) -> None:
    """Startup and shutdown run, lifespan state reaches requests, and lifespan itself has no scope."""
    tracker = Tracker()
    lifespan_events: list[str] = []

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        try:
            container.thing()
        except NoRequestScopeError:
            lifespan_events.append("startup (no request scope)")
        yield {"greeting": "hello"}
        lifespan_events.append("shutdown")

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/")
    @inject
    async def endpoint(request: Request, thing: Thing = Depends(Provide[Container.thing])) -> dict[str, Any]:
        return {"greeting": request.state.greeting, "same": container.thing() is thing}

    container = wire(Container())
    with TestClient(app) as client:
        assert lifespan_events == ["startup (no request scope)"]
        body = client.get("/").json()
    assert lifespan_events == ["startup (no request scope)", "shutdown"]
    assert body == {"greeting": "hello", "same": True}
    assert tracker.events == ["create thing", "teardown thing"]


# --------------------------------------------------------------------------------------------------
# Isolation between concurrent requests.
# --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_hundreds_of_concurrent_in_process_requests_never_see_another_requests_instance(
    wire: Any,
) -> None:
    """300 concurrent requests (200 async held open together, 100 sync) each keep their own instance."""
    n_async, n_sync = 200, 100
    tracker = Tracker()
    arrived = 0
    all_async_arrived = anyio.Event()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    @inject
    def get_thing(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    def stamp(thing: Thing, marker: str) -> None:
        if thing.owner is None:
            thing.owner = marker

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/async/{marker}")
    @inject
    async def async_endpoint(marker: str, thing: Thing = Depends(Provide[Container.thing])) -> dict[str, Any]:
        nonlocal arrived
        stamp(thing, marker)
        arrived += 1
        if arrived == n_async:
            all_async_arrived.set()
        await all_async_arrived.wait()  # every async request holds its instance at the same time
        return {"owner": thing.owner, "same": get_thing() is thing}

    @inject
    def sync_dependency(marker: str, thing: Thing = Depends(Provide[Container.thing])) -> Thing:
        stamp(thing, marker)
        return thing

    @app.get("/sync/{marker}")
    @inject
    def sync_endpoint(
        marker: str,
        stamped: Thing = Depends(sync_dependency),
        thing: Thing = Depends(Provide[Container.thing]),
    ) -> dict[str, Any]:
        return {"owner": thing.owner, "same": stamped is thing and get_thing() is thing}

    wire(Container())
    paths = [f"/async/a{i}" for i in range(n_async)] + [f"/sync/s{i}" for i in range(n_sync)]
    async with client_for(app) as client:
        with anyio.fail_after(30):
            responses = await asyncio.gather(*(client.get(path) for path in paths))

    for path, response in zip(paths, responses, strict=True):
        body = response.json()
        assert body == {"owner": path.rsplit("/", 1)[1], "same": True}, path
    assert len(tracker.created) == n_async + n_sync
    assert len({id(thing) for thing in tracker.created}) == n_async + n_sync  # all alive: distinct
    assert tracker.count("teardown thing") == n_async + n_sync


# --------------------------------------------------------------------------------------------------
# No scope: missing middleware, work that outlives its request.
# --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_resolving_in_an_app_without_the_middleware_raises_an_error_naming_it(wire: Any) -> None:
    """Without RequestScopeMiddleware, resolving raises NoRequestScopeError saying to add it."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()  # no middleware

    @app.get("/")
    @inject
    async def endpoint(thing: Thing = Depends(Provide[Container.thing])) -> dict[str, str]:
        return {}

    wire(Container())
    async with client_for(app) as client:
        with pytest.raises(NoRequestScopeError, match=r"RequestScopeMiddleware") as excinfo:
            await client.get("/")
    assert "Container.thing" in str(excinfo.value)
    assert tracker.created == []


@pytest.mark.anyio
async def test_task_that_outlives_its_request_cannot_resolve_from_the_closed_scope(wire: Any) -> None:
    """A task started by the endpoint that resolves after the request ended gets NoRequestScopeError."""
    tracker = Tracker()
    request_finished = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")
        other = RequestScoped(tracker.resource, "other")

    @inject
    def get_thing(thing: Thing = Provide[Container.thing]) -> Thing:
        return thing

    @inject
    def get_other(other: Thing = Provide[Container.other]) -> Thing:
        return other

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/")
    @inject
    async def endpoint(thing: Thing = Depends(Provide[Container.thing])) -> dict[str, str]:
        async def later() -> list[str]:
            await request_finished.wait()
            errors = []
            for resolve in (get_thing, get_other, current_scope):
                try:
                    resolve()
                except NoRequestScopeError as exc:
                    errors.append(str(exc))
            return errors

        tasks.append(asyncio.ensure_future(later()))
        return {}

    wire(Container())
    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 200
    assert tracker.events == ["create thing", "teardown thing"]

    request_finished.set()
    with anyio.fail_after(WAIT):
        errors = await tasks[0]

    assert len(errors) == 3
    assert all("already closed" in error for error in errors)
    assert tracker.events == ["create thing", "teardown thing"]  # nothing created from a closed scope


def test_websocket_closed_before_accept_is_a_rejected_handshake_and_a_failure(wire: Any) -> None:
    """Closing before accept() (the server answers 403) hands finalizers a failure, like a denial response."""
    tracker = Tracker()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(tracker.resource, "thing")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.websocket("/ws")
    @inject
    async def ws(websocket: WebSocket, thing: Thing = Depends(Provide[Container.thing])) -> None:
        await websocket.close()

    wire(Container())
    with TestClient(app) as client, pytest.raises(WebSocketDisconnect):  # noqa: SIM117
        with client.websocket_connect("/ws"):
            pass

    failure = tracker.failure_of("thing")
    assert isinstance(failure, RequestFailed)
    assert failure.status_code == 403


@pytest.mark.anyio
async def test_teardown_completes_when_the_request_task_is_cancelled_again_during_it() -> None:
    """A second native cancellation while a finalizer awaits its rollback does not cut the finalizer short."""
    teardown_started, release = asyncio.Event(), asyncio.Event()
    steps: list[str] = []

    async def connection() -> AsyncIterator[str]:
        try:
            yield "conn"
        finally:
            teardown_started.set()
            await release.wait()  # e.g. awaiting ROLLBACK on the network
            steps.append("teardown finished")

    provider = RequestScoped(connection)
    entered = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await provider()
        entered.set()
        await asyncio.Event().wait()

    client = RawClient()
    task = asyncio.ensure_future(RequestScopeMiddleware(app)(http_scope("/"), client.receive, client.send))
    with anyio.fail_after(WAIT):
        await entered.wait()
    task.cancel()
    with anyio.fail_after(WAIT):
        await teardown_started.wait()
    task.cancel()  # cancelled again, mid-teardown
    release.set()
    with pytest.raises(asyncio.CancelledError), anyio.fail_after(WAIT):
        await task
    assert steps == ["teardown finished"]


@pytest.mark.anyio
async def test_a_before_response_hook_registered_after_the_status_was_sent_is_refused(wire: Any) -> None:
    """Registering a hook that could never run (the response already started) raises ScopeMisuseError."""
    outcome: list[BaseException] = []
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"started"
            try:
                current_scope().call_before_response(lambda: None)
            except ScopeMisuseError as exc:
                outcome.append(exc)

        return StreamingResponse(body())

    async with client_for(app) as client:
        assert (await client.get("/stream")).text == "started"
    assert len(outcome) == 1
    assert "already started" in str(outcome[0])


@pytest.mark.parametrize(("code", "failed"), [(1000, False), (1001, False), (1011, True)])
def test_websocket_the_client_closes_abnormally_is_a_failure(code: int, failed: bool) -> None:
    """A client close with a code other than 1000/1001 is a failure, even when the app catches it."""
    tracker = Tracker()
    thing = RequestScoped(tracker.resource, "thing")
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)
    disconnected = threading.Event()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        thing()
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            disconnected.set()

    with TestClient(app) as client:
        with client.websocket_connect("/ws") as websocket:
            websocket.send_text("hi")
            websocket.close(code=code)
        assert disconnected.wait(WAIT)
    assert tracker.torn_down.wait(WAIT)
    failure = tracker.failure_of("thing")
    assert isinstance(failure, RequestFailed) is failed
    if failed:
        assert str(code) in str(failure)
