"""di_request_scope.fastapi: markers that FastAPI awaits on the event loop instead of its threadpool."""

from __future__ import annotations

import threading
import types
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import anyio
import anyio.to_thread
import httpx
import pytest
from dependency_injector import containers, providers, wiring
from dependency_injector.wiring import inject
from fastapi import Depends, FastAPI

from di_request_scope import RequestScoped, RequestScopeMiddleware
from di_request_scope.fastapi import Closing, Provide, Provider
from di_request_scope.fastapi import inject as hidden_inject

WAIT = 10  # bounds a wait only a bug makes long


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Container(containers.DeclarativeContainer):
    thing = RequestScoped(object)
    things = providers.List(thing, thing)


app = FastAPI()
app.add_middleware(RequestScopeMiddleware)


@app.get("/fast")
@inject
async def fast(
    first: object = Depends(Provide[Container.thing]),
    second: object = Depends(Provide[Container.thing]),
    provider: Any = Depends(Provider[Container.thing]),
) -> dict[str, bool]:
    return {"same": first is second, "provider": provider() is first}


@app.get("/classic")
@inject
async def classic(first: object = Depends(wiring.Provide[Container.thing])) -> dict[str, bool]:
    return {"same": first is not None}


created_in: list[int] = []


def make_thing() -> object:
    created_in.append(threading.get_ident())
    return object()


class HiddenContainer(containers.DeclarativeContainer):
    thing = RequestScoped(make_thing)


Thing = Annotated[object, wiring.Provide[HiddenContainer.thing]]


@app.get("/hidden")
@hidden_inject
async def hidden(
    q: int,
    first: Thing,
    second: object = wiring.Provide[HiddenContainer.thing],
    third: object = Depends(wiring.Provide[HiddenContainer.thing]),
) -> dict[str, Any]:
    return {"q": q, "same": first is second is third, "loop": threading.get_ident()}


@app.get("/hidden-sync")
@hidden_inject
def hidden_sync(first: Thing, second: object = wiring.Provide[HiddenContainer.thing]) -> dict[str, Any]:
    return {"same": first is second, "thread": threading.get_ident()}


@pytest.fixture
def wired() -> Iterator[Container]:
    container = Container()
    container.wire(modules=[__name__])
    hidden_container = HiddenContainer()
    hidden_container.wire(modules=[__name__])
    yield container
    hidden_container.unwire()
    container.unwire()


@pytest.fixture
async def no_free_worker_thread() -> AsyncIterator[None]:
    """Hold the only token of anyio's default thread limiter: any threadpool call now waits."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    total = limiter.total_tokens
    limiter.total_tokens = 1
    borrower = object()
    await limiter.acquire_on_behalf_of(borrower)
    try:
        yield
    finally:
        limiter.release_on_behalf_of(borrower)
        limiter.total_tokens = total


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_markers_are_dependency_injector_markers() -> None:
    """The drop-ins subclass dependency-injector's markers, so wiring treats them as its own."""
    assert isinstance(Provide[Container.thing], wiring.Provide)
    assert isinstance(Provider[Container.thing], wiring.Provider)
    assert isinstance(Closing[Provide[Container.thing]], wiring.Closing)


@pytest.mark.anyio
async def test_injection_needs_no_worker_thread(wired: Container, no_free_worker_thread: None) -> None:
    """With every worker thread taken, an async endpoint using the drop-in Provide still answers."""
    async with client() as http:
        with anyio.fail_after(WAIT):
            response = await http.get("/fast")
    assert response.json() == {"same": True, "provider": True}


@pytest.mark.anyio
async def test_classic_provide_waits_for_a_worker_thread(
    wired: Container, no_free_worker_thread: None
) -> None:
    """The contrast: dependency-injector's own Provide marker is run in the threadpool, so it waits."""
    async with client() as http:
        with anyio.move_on_after(0.5) as waited:
            await http.get("/classic")
    assert waited.cancelled_caught


@pytest.mark.anyio
async def test_classic_provide_still_works_with_threads_free(wired: Container) -> None:
    """Both spellings inject the request's instance when threads are available."""
    async with client() as http:
        assert (await http.get("/classic")).json() == {"same": True}
        assert (await http.get("/fast")).json() == {"same": True, "provider": True}


def test_inject_hides_the_injected_parameters_from_fastapi() -> None:
    """FastAPI sees only the endpoint's own parameters: nothing to solve, nothing in the OpenAPI schema."""
    parameters = app.openapi()["paths"]["/hidden"]["get"]["parameters"]
    assert [parameter["name"] for parameter in parameters] == ["q"]
    assert "parameters" not in app.openapi()["paths"]["/hidden-sync"]["get"]


@pytest.mark.anyio
async def test_inject_resolves_on_the_event_loop_with_every_worker_thread_taken(
    wired: Container, no_free_worker_thread: None
) -> None:
    """An async endpoint's hidden parameters are resolved by @inject itself, on the loop, all one instance."""
    created_in.clear()
    async with client() as http:
        with anyio.fail_after(WAIT):
            response = await http.get("/hidden", params={"q": 3})
    body = response.json()
    assert body == {"q": 3, "same": True, "loop": threading.get_ident()}
    assert created_in == [threading.get_ident()]  # created once, on the loop


@pytest.mark.anyio
async def test_inject_resolves_a_sync_endpoints_parameters_in_its_worker_thread(wired: Container) -> None:
    """A def endpoint gets its instances in the one thread hop FastAPI makes for the endpoint itself."""
    created_in.clear()
    async with client() as http:
        body = (await http.get("/hidden-sync")).json()
    assert body["same"] is True
    assert created_in == [body["thread"]]
    assert body["thread"] != threading.get_ident()


# --- di_request_scope.fastapi.inject resolves the injections itself ------------------------------


async def _wait_for_each_other(events: tuple[anyio.Event, anyio.Event], index: int) -> str:
    """Done only once the other one started too: awaited one after the other, they would never finish."""
    events[index].set()
    await events[1 - index].wait()
    return f"side {index}"


def _logged_resource(log: list[str]) -> Iterator[list[str]]:
    log.append("initialised")
    yield log
    log.append("shut down")


class ResolvingContainer(containers.DeclarativeContainer):
    label = providers.Object("first container")
    events = providers.Object(None)  # overridden per test with a pair of anyio.Event
    left = providers.Factory(_wait_for_each_other, events, 0)
    right = providers.Factory(_wait_for_each_other, events, 1)
    log = providers.Object([])
    resource = providers.Resource(_logged_resource, log)


@hidden_inject
async def labelled(label: str = wiring.Provide[ResolvingContainer.label]) -> str:
    return label


@hidden_inject
def labelled_sync(label: str = wiring.Provide[ResolvingContainer.label]) -> str:
    return label


@hidden_inject
async def two_async(
    left: str = wiring.Provide[ResolvingContainer.left], right: str = wiring.Provide[ResolvingContainer.right]
) -> tuple[str, str]:
    return left, right


@hidden_inject
async def one_async(left: str = wiring.Provide[ResolvingContainer.left]) -> str:
    return left


@hidden_inject
async def closing(log: list[str] = wiring.Closing[wiring.Provide[ResolvingContainer.resource]]) -> list[str]:
    return list(log)


@pytest.fixture
def resolving() -> Iterator[ResolvingContainer]:
    container = ResolvingContainer()
    container.wire(modules=[__name__])
    yield container
    container.unwire()


@pytest.mark.anyio
async def test_inject_awaits_async_providers_and_runs_several_at_once(resolving: ResolvingContainer) -> None:
    """An async provider's result is awaited; two are awaited together, as dependency-injector does."""
    resolving.events.override(providers.Object((anyio.Event(), anyio.Event())))
    with anyio.fail_after(WAIT):
        assert await two_async() == ("side 0", "side 1")
    other_side_started = anyio.Event()
    other_side_started.set()
    resolving.events.override(providers.Object((anyio.Event(), other_side_started)))
    with anyio.fail_after(WAIT):
        assert await one_async() == "side 0"


@pytest.mark.anyio
async def test_inject_passes_explicit_arguments_through(resolving: ResolvingContainer) -> None:
    """A caller's own argument wins over the injection, for async and sync functions."""
    assert await labelled(label="given") == "given"
    assert labelled_sync(label="given") == "given"
    # A marker passed explicitly is injected, as dependency-injector does.
    assert await labelled(label=wiring.Provide[ResolvingContainer.label]) == "first container"
    assert await labelled() == "first container"
    assert labelled_sync() == "first container"


@pytest.mark.anyio
async def test_inject_follows_wiring_unwiring_and_rewiring() -> None:
    """Each call reads what wiring bound last: a new container after unwire() is the one injected."""
    first = ResolvingContainer()
    first.wire(modules=[__name__])
    try:
        assert await labelled() == "first container"
    finally:
        first.unwire()
    assert isinstance(await labelled(), wiring.Provide)  # unwired: the marker itself, as with @inject
    second = ResolvingContainer(label=providers.Object("second container"))
    second.wire(modules=[__name__])
    try:
        assert await labelled() == "second container"
        assert labelled_sync() == "second container"
    finally:
        second.unwire()


@pytest.mark.anyio
async def test_inject_shuts_a_closing_resource_down_after_the_call(resolving: ResolvingContainer) -> None:
    """``Closing[...]`` keeps dependency-injector's behaviour: the resource is shut down after the call."""
    log: list[str] = []
    resolving.log.override(providers.Object(log))
    assert await closing() == ["initialised"]
    assert log == ["initialised", "shut down"]
    assert not resolving.resource.initialized


@pytest.mark.anyio
async def test_inject_is_wired_through_a_module_that_only_imports_the_function() -> None:
    """``wire(modules=[app.api])`` binds endpoints that ``app.api`` only re-exports from elsewhere."""
    reexports = types.ModuleType("reexports")
    reexports.labelled = labelled  # type: ignore[attr-defined]
    container = ResolvingContainer(label=providers.Object("wired through the re-export"))
    container.wire(modules=[reexports])
    try:
        assert await labelled() == "wired through the re-export"
    finally:
        container.unwire()
