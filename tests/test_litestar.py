"""RequestScopeMiddleware in Litestar apps: where it sits, what it sees, and Litestar's injection.

Litestar applies its ``middleware=[...]`` per route, inside the app's exception
handling and outside the route's: an exception a handler raises is answered by
Litestar before the middleware sees anything but the status. The middleware can
also wrap the whole Litestar app. Both placements are tested. Request-scoped
instances reach handlers through Litestar's dependency injection, with the
``provide()`` helper of ``examples/litestar_app``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import httpx
import pytest
from dependency_injector import containers, providers
from litestar import Litestar, Request, Response, Router, WebSocket, get, post, websocket
from litestar.background_tasks import BackgroundTask
from litestar.concurrency import get_asyncio_executor, set_asyncio_executor
from litestar.di import NamedDependency, Provide
from litestar.exceptions import LitestarException, NotFoundException
from litestar.middleware import DefineMiddleware
from litestar.params import FromPath, JSONBody
from litestar.response import Stream
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from di_request_scope import (
    NoRequestScopeError,
    RequestFailed,
    RequestScoped,
    RequestScopeMiddleware,
    container_lifespan,
    current_scope,
)
from examples.litestar_app.dependencies import provide

WAIT = 10  # bounds a wait only a bug makes long; never orders anything

PLACEMENTS = ["route middleware", "wrapping the app"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Thing:
    """A request-scoped object with a serial number."""

    serial = itertools.count(1)

    def __init__(self) -> None:
        self.n = next(Thing.serial)


class Recorder:
    """The initializer of a request-scoped Thing, logging its teardown and the outcome it was handed."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.outcomes: list[BaseException | None] = []
        self.created = 0

    def thing(self) -> Iterator[Thing]:
        self.created += 1
        try:
            yield Thing()
        except BaseException as exc:
            self.outcomes.append(exc)
            raise
        finally:
            self.events.append("teardown")
        self.outcomes.append(None)


def container_for(recorder: Recorder) -> Any:
    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(recorder.thing)

    return Container()


def build(placement: str, **config: Any) -> Any:
    """A Litestar app with the middleware in its ``middleware`` list, or wrapped around it."""
    config.setdefault("logging_config", None)  # keep Litestar off the root logger
    if placement == "route middleware":
        return Litestar(middleware=[RequestScopeMiddleware], **config)
    return RequestScopeMiddleware(Litestar(**config))


class BoundedClient(httpx.AsyncClient):
    """An in-process client whose requests fail, instead of hanging, if the app deadlocks."""

    async def send(self, *args: Any, **kwargs: Any) -> httpx.Response:
        with anyio.fail_after(WAIT):
            return await super().send(*args, **kwargs)


def client_for(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return BoundedClient(transport=transport, base_url="http://testserver")


# --------------------------------------------------------------------------------------------------
# Injection points
# --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("handler", ["async", "sync in a thread", "sync on the loop"])
async def test_every_litestar_injection_point_gets_the_requests_one_instance(
    placement: str, handler: str
) -> None:
    """Guard, hooks, dependencies, handler, streamed body and background task share one instance."""
    recorder = Recorder()
    container = container_for(recorder)
    seen: list[tuple[str, int]] = []

    def mark(where: str) -> None:
        seen.append((where, container.thing().n))
        recorder.events.append(where)

    async def guard(connection: Any, route_handler: Any) -> None:
        mark("guard")

    async def before_request(request: Request[Any, Any, Any]) -> None:
        mark("before_request")

    async def after_response(request: Request[Any, Any, Any]) -> None:
        mark("after_response")

    def threaded_dependency() -> int:
        mark("dependency in a thread")
        return 0

    def generator_dependency() -> Iterator[int]:
        mark("generator dependency")
        yield 0
        mark("generator dependency cleanup")

    def respond(thing: Thing, threaded: int, generated: int) -> Stream:
        mark("handler")

        def body() -> Iterator[str]:  # iterated in a worker thread
            mark("body")
            yield f"{thing.n}"

        return Stream(body(), background=BackgroundTask(mark, "background task"))

    @get("/async", guards=[guard])
    async def async_handler(
        thing: NamedDependency[Thing], threaded: NamedDependency[int], generated: NamedDependency[int]
    ) -> Stream:
        return respond(thing, threaded, generated)

    @get("/sync in a thread", guards=[guard], sync_to_thread=True)
    def sync_handler(
        thing: NamedDependency[Thing], threaded: NamedDependency[int], generated: NamedDependency[int]
    ) -> Stream:
        return respond(thing, threaded, generated)

    @get("/sync on the loop", guards=[guard], sync_to_thread=False)
    def loop_handler(
        thing: NamedDependency[Thing], threaded: NamedDependency[int], generated: NamedDependency[int]
    ) -> Stream:
        return respond(thing, threaded, generated)

    app = build(
        placement,
        route_handlers=[async_handler, sync_handler, loop_handler],
        dependencies={
            "thing": provide(container.thing),
            "threaded": Provide(threaded_dependency, sync_to_thread=True),
            "generated": Provide(generator_dependency),
        },
        before_request=before_request,
        after_response=after_response,
    )
    async with client_for(app) as client:
        first = await client.get(f"/{handler}")
        second = await client.get(f"/{handler}")

    assert first.status_code == second.status_code == 200
    assert recorder.created == 2
    first_n, second_n = int(first.text), int(second.text)
    assert first_n != second_n
    per_request = len(seen) // 2
    assert {n for _, n in seen[:per_request]} == {first_n}
    assert {n for _, n in seen[per_request:]} == {second_n}
    events = recorder.events[: per_request + 1]
    assert events[:2] == ["guard", "before_request"]
    # One dependency batch, resolved concurrently: in either order.
    assert set(events[2:4]) == {"dependency in a thread", "generator dependency"}
    assert events[4:] == [
        "handler",
        "generator dependency cleanup",  # Litestar cleans up before it sends the response
        "body",
        "background task",
        "after_response",
        "teardown",  # only once all of the above finished
    ]
    assert recorder.outcomes == [None, None]


@pytest.fixture
def counted_executor() -> Iterator[list[str]]:
    """Litestar's worker threads, counting each call sent to them."""
    calls: list[str] = []

    class CountingExecutor(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            calls.append(repr(fn))
            return super().submit(fn, *args, **kwargs)

    previous = get_asyncio_executor()
    executor = CountingExecutor(max_workers=1)
    set_asyncio_executor(executor)
    try:
        yield calls
    finally:
        set_asyncio_executor(previous)
        executor.shutdown()


@pytest.mark.anyio
async def test_provide_resolves_on_the_event_loop_without_a_worker_thread(
    counted_executor: list[str],
) -> None:
    """provide() costs no thread hop; Provide(..., sync_to_thread=True) costs one per dependency."""
    recorder = Recorder()
    container = container_for(recorder)

    def from_a_thread() -> Thing:
        return container.thing()

    @get("/")
    async def handler(thing: NamedDependency[Thing], threaded: NamedDependency[Thing]) -> dict[str, bool]:
        return {"same": thing is threaded}

    app = build(
        "route middleware",
        route_handlers=[handler],
        dependencies={
            "thing": provide(container.thing),
            "threaded": Provide(from_a_thread, sync_to_thread=True),
        },
    )
    async with client_for(app) as client:
        assert (await client.get("/")).json() == {"same": True}
    assert len(counted_executor) == 1  # the sync_to_thread dependency; provide() used none
    assert recorder.created == 1


@pytest.mark.anyio
async def test_provide_awaits_an_async_provider() -> None:
    """provide() serves providers whose instance is created asynchronously, like an AsyncSession."""

    async def create() -> Thing:
        return Thing()

    class Container(containers.DeclarativeContainer):
        thing = RequestScoped(create)

    container = Container()

    @get("/")
    async def handler(thing: NamedDependency[Thing], again: NamedDependency[Thing]) -> dict[str, Any]:
        return {"type": type(thing).__name__, "same": thing is again is await container.thing()}

    app = build(
        "route middleware",
        route_handlers=[handler],
        dependencies={"thing": provide(container.thing), "again": provide(container.thing)},
    )
    async with client_for(app) as client:
        assert (await client.get("/")).json() == {"type": "Thing", "same": True}


# --------------------------------------------------------------------------------------------------
# Outcome: Litestar answers exceptions, the middleware sees the status
# --------------------------------------------------------------------------------------------------


class ConflictError(Exception):
    pass


@pytest.mark.anyio
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        ("ok", 200),
        ("http_exception", 404),
        ("handled", 409),
        ("unhandled", 500),
        ("returned", 422),
        ("invalid_body", 400),
    ],
)
async def test_the_finalizer_gets_the_status_litestar_answered_with(
    placement: str, outcome: str, status: int
) -> None:
    """Handled or not, an exception reaches the finalizer as RequestFailed with Litestar's status."""
    recorder = Recorder()
    container = container_for(recorder)

    @post("/{outcome:str}", sync_to_thread=False)
    def handler(
        outcome: FromPath[str], thing: NamedDependency[Thing], data: JSONBody[dict[str, int]]
    ) -> Response[str]:
        if outcome == "http_exception":
            raise NotFoundException("no such thing")
        if outcome == "handled":
            raise ConflictError
        if outcome == "unhandled":
            raise RuntimeError("boom")
        return Response("done", status_code=422 if outcome == "returned" else 200)

    def conflict(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
        return Response("conflict", status_code=409)

    app = build(
        placement,
        route_handlers=[handler],
        dependencies={"thing": provide(container.thing)},
        exception_handlers={ConflictError: conflict},
    )
    body: Any = "not a dict" if outcome == "invalid_body" else {"n": 1}
    async with client_for(app) as client:  # nothing is raised: Litestar answered every exception
        response = await client.post(f"/{outcome}", json=body)

    assert response.status_code == status
    [failure] = recorder.outcomes
    if status == 200:
        assert failure is None
    else:
        assert type(failure) is RequestFailed  # the status, never the handler's exception
        assert failure.status_code == status
    assert recorder.events == ["teardown"]


@pytest.mark.anyio
async def test_is_failure_status_is_set_with_define_middleware() -> None:
    """DefineMiddleware passes is_failure_status: here a 404 keeps the request's work, a 500 does not."""
    recorder = Recorder()
    container = container_for(recorder)

    @get("/{status:int}", sync_to_thread=False)
    def handler(status: FromPath[int], thing: NamedDependency[Thing]) -> Response[str]:
        return Response("", status_code=status)

    app = Litestar(
        route_handlers=[handler],
        dependencies={"thing": provide(container.thing)},
        middleware=[DefineMiddleware(RequestScopeMiddleware, is_failure_status=lambda status: status >= 500)],
        logging_config=None,
    )
    async with client_for(app) as client:
        assert (await client.get("/404")).status_code == 404
        assert (await client.get("/503")).status_code == 503

    first, second = recorder.outcomes
    assert first is None
    assert isinstance(second, RequestFailed)
    assert second.status_code == 503


@pytest.mark.anyio
@pytest.mark.parametrize("placement", PLACEMENTS)
async def test_a_failing_before_response_hook_is_a_500_instead_of_the_handlers_status(placement: str) -> None:
    """A commit that fails before the status is raised past Litestar's exception handling: a 500."""
    recorder = Recorder()
    container = container_for(recorder)

    def failing_commit() -> None:
        raise RuntimeError("commit failed")

    @post("/", sync_to_thread=False)
    def handler(thing: NamedDependency[Thing]) -> str:
        current_scope().call_before_response(failing_commit)
        return "created"

    def handle_everything(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
        return Response("handled", status_code=418)  # never used: the response had already started

    config: dict[str, Any] = {
        "route_handlers": [handler],
        "dependencies": {"thing": provide(container.thing)},
        "exception_handlers": {RuntimeError: handle_everything, LitestarException: handle_everything},
    }
    async with client_for(build(placement, **config), raise_app_exceptions=False) as client:
        assert (await client.post("/")).status_code == 500  # the server's answer, not a 201
    with pytest.raises(LitestarException, match="Exception caught after response started") as raised:
        async with client_for(build(placement, **config)) as client:
            await client.post("/")

    # In both placements an exception handler of Litestar's sits between the middleware and the
    # handler; it finds the response started (the middleware was sending the status) and
    # re-raises the error wrapped, past every exception handler, to the server: a 500.
    cause: BaseException | None = raised.value
    while cause is not None and not isinstance(cause, RuntimeError):
        cause = cause.__cause__
    assert str(cause) == "commit failed"
    assert [type(outcome) for outcome in recorder.outcomes] == [RuntimeError, RuntimeError]


# --------------------------------------------------------------------------------------------------
# Layers, lifespan, WebSockets, no middleware
# --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_middleware_on_app_router_and_handler_layers_opens_one_scope() -> None:
    """Litestar stacks each layer's middleware on the route: the inner copies join the outermost's scope."""
    recorder = Recorder()
    container = container_for(recorder)
    scopes: list[Any] = []

    @get("/handler", middleware=[RequestScopeMiddleware], sync_to_thread=False)
    def handler(thing: NamedDependency[Thing]) -> Response[str]:
        scopes.append(current_scope())
        return Response("", status_code=404)

    router = Router("/router", route_handlers=[handler], middleware=[RequestScopeMiddleware])
    app = Litestar(
        route_handlers=[router],
        middleware=[RequestScopeMiddleware],
        dependencies={"thing": provide(container.thing)},
        logging_config=None,
    )
    # The outermost copy keeps a 404's work; the inner copies, with the default rule, would not.
    outermost = RequestScopeMiddleware(app, is_failure_status=lambda status: status >= 500)
    async with client_for(outermost) as client:
        assert (await client.get("/router/handler")).status_code == 404
        assert (await client.get("/router/handler")).status_code == 404

    assert recorder.created == 2
    assert recorder.events == ["teardown", "teardown"]
    assert recorder.outcomes == [None, None]  # the outermost copy's scope: the 404 is no failure
    assert scopes[0] is not scopes[1]


@pytest.mark.anyio
@pytest.mark.parametrize("placement", PLACEMENTS)
async def test_a_path_no_route_matches_is_in_a_scope_only_when_the_middleware_wraps_the_app(
    placement: str,
) -> None:
    """Litestar's router answers unknown paths before any route middleware runs."""
    in_scope: list[bool] = []

    async def after_exception(exc: Exception, scope: Any) -> None:
        try:
            current_scope()
        except NoRequestScopeError:
            in_scope.append(False)
        else:
            in_scope.append(True)

    @get("/", sync_to_thread=False)
    def handler() -> str:
        return ""

    app = build(placement, route_handlers=[handler], after_exception=[after_exception])
    async with client_for(app) as client:
        assert (await client.get("/nowhere")).status_code == 404
    assert in_scope == [placement == "wrapping the app"]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_container_lifespan_in_litestars_lifespan_list(placement: str) -> None:
    """Litestar runs container_lifespan; wrapped in the middleware, the lifespan passes through untouched."""
    events: list[str] = []

    def resource() -> Iterator[str]:
        events.append("init")
        yield "resource"
        events.append("shutdown")

    class Container(containers.DeclarativeContainer):
        resource_ = providers.Resource(resource)

    container = Container()

    @get("/", sync_to_thread=False)
    def handler() -> str:
        events.append("request")
        return str(container.resource_())

    app = build(placement, route_handlers=[handler], lifespan=[container_lifespan(container)])
    with TestClient(app) as client:
        assert client.get("/").text == "resource"
    assert events == ["init", "request", "shutdown"]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    ("ending", "failed"),
    [("normal close", False), ("raise after accept", True), ("raise before accept", True)],
)
def test_a_websocket_connection_has_one_instance_and_its_ending_decides_the_outcome(
    placement: str, ending: str, failed: bool
) -> None:
    """A normal close succeeds; an exception Litestar turns into a 4500 close, or a refusal, fails."""
    recorder = Recorder()
    container = container_for(recorder)

    @websocket("/ws")
    async def handler(socket: WebSocket[Any, Any, Any], thing: NamedDependency[Thing]) -> None:
        if ending == "raise before accept":
            raise RuntimeError("refused")
        await socket.accept()
        for _ in range(2):
            await socket.receive_text()
            await socket.send_json({"n": thing.n, "same": container.thing() is thing})
        if ending == "raise after accept":
            raise RuntimeError("broken")
        await socket.close()

    app = build(placement, route_handlers=[handler], dependencies={"thing": provide(container.thing)})
    with TestClient(app) as client:
        for _ in range(2):  # two connections
            if ending == "raise before accept":
                with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws"):
                    pass
                assert refused.value.code == 4500  # Litestar's answer to the exception
                continue
            with client.websocket_connect("/ws") as ws:
                replies = []
                for _ in range(2):  # two messages, one instance
                    ws.send_text("ping")
                    replies.append(ws.receive_json())
                assert replies[0] == replies[1]
                assert replies[0]["same"] is True

    assert recorder.created == 2  # one per connection, shared by its messages
    if failed:
        assert all(isinstance(outcome, RequestFailed) for outcome in recorder.outcomes)
    else:
        assert recorder.outcomes == [None, None]


@pytest.mark.anyio
async def test_without_the_middleware_resolving_fails_with_no_request_scope_error() -> None:
    """Litestar answers the error with a 500; its handler receives NoRequestScopeError naming the fix."""
    recorder = Recorder()
    container = container_for(recorder)
    errors: list[Exception] = []

    @get("/", sync_to_thread=False)
    def handler(thing: NamedDependency[Thing]) -> int:
        return thing.n

    def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
        errors.append(exc)
        return Response("error", status_code=500)

    app = Litestar(
        route_handlers=[handler],
        dependencies={"thing": provide(container.thing)},
        exception_handlers={500: internal_error},
        logging_config=None,
    )
    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 500
    [error] = errors
    assert isinstance(error, NoRequestScopeError)
    assert "RequestScopeMiddleware" in str(error)
    assert recorder.created == 0
