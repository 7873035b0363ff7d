"""Misuse: a scope taken to another event loop; work that outlives its request, on a real server.

The other misuses of the issue are tested where they live: resolving outside a
scope (tests/test_provider.py, tests/test_asgi.py), the middleware added twice
and mounted sub-applications (tests/test_asgi.py), nested ``request_scope()``
(tests/test_scope.py), captive dependencies (tests/test_validation.py).
"""

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from dependency_injector import containers
from fastapi import FastAPI

from di_request_scope import (
    NoRequestScopeError,
    RequestScoped,
    RequestScopeMiddleware,
    ScopeMisuseError,
    current_scope,
    request_scope,
)

WAIT = 30  # bounds a wait that only a bug would make long


class Connection:
    """Stands in for an AsyncSession: an async instance bound to the loop that created it."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()


def resolve_on_a_new_loop(context: contextvars.Context, provider: Any) -> Any:
    """In another thread, run a new event loop in ``context`` (the request's) and await ``provider()``."""

    async def resolve() -> Any:
        return await provider()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(context.run, asyncio.run, resolve()).result(WAIT)


@pytest.mark.anyio
async def test_async_instance_being_created_on_one_loop_resolved_from_another_raises_scope_misuse() -> None:
    """Loop B joining loop A's in-flight creation is refused: an await across loops would hang or break."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def connect() -> AsyncIterator[Connection]:
        entered.set()
        await release.wait()
        yield Connection()

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(connect)

    container = Container()
    async with request_scope():
        creation = asyncio.ensure_future(container.db())
        await asyncio.wait_for(entered.wait(), WAIT)  # loop A is creating it
        with pytest.raises(ScopeMisuseError) as info:
            await asyncio.to_thread(resolve_on_a_new_loop, contextvars.copy_context(), container.db)
        release.set()
        instance = await creation
        assert instance.loop is asyncio.get_running_loop()
    message = str(info.value)
    assert message.startswith("Container.db ")
    assert "another event loop" in message
    assert "one event loop" in message


@pytest.mark.anyio
async def test_async_instance_created_on_one_loop_resolved_from_another_raises_scope_misuse() -> None:
    """An AsyncSession made on loop A, resolved from loop B in another thread: a clear error, not it."""

    async def connect() -> AsyncIterator[Connection]:
        yield Connection()

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(connect)

    container = Container()
    async with request_scope():
        instance = await container.db()
        with pytest.raises(ScopeMisuseError, match="another event loop"):
            await asyncio.to_thread(resolve_on_a_new_loop, contextvars.copy_context(), container.db)
        assert await container.db() is instance  # its own loop still gets it


@pytest.mark.server
def test_task_that_outlives_its_request_on_uvicorn_gets_a_closed_scope_error(uvicorn_server: Any) -> None:
    """A task the endpoint started and left running cannot resolve after the response: NoRequestScopeError."""
    torn_down = threading.Event()
    outcome: dict[str, Any] = {}
    finished = threading.Event()
    created: list[object] = []

    def thing() -> Any:
        created.append(instance := object())
        yield instance
        torn_down.set()

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(thing)

    container = Container()
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)
    request_over = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    server_loop: list[asyncio.AbstractEventLoop] = []

    async def later() -> None:
        await request_over.wait()
        for name, resolve in (("db", container.db), ("current_scope", current_scope)):
            try:
                outcome[name] = resolve()
            except NoRequestScopeError as exc:
                outcome[name] = exc
        finished.set()

    @app.get("/")
    async def endpoint() -> dict[str, str]:
        container.db()
        server_loop.append(asyncio.get_running_loop())
        tasks.append(server_loop[0].create_task(later()))  # fire and forget
        return {"status": "accepted"}

    with uvicorn_server(app) as server:
        assert httpx.get(server.url, timeout=WAIT).status_code == 200
        assert torn_down.wait(WAIT)  # the request's scope has closed
        server_loop[0].call_soon_threadsafe(request_over.set)
        assert finished.wait(WAIT)

    assert len(created) == 1  # nothing was created from the closed scope
    for name in ("db", "current_scope"):
        error = outcome[name]
        assert isinstance(error, NoRequestScopeError), (name, error)
        assert "already closed" in str(error)
        assert "outlived its request" in str(error)
