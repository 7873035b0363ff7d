"""container_lifespan: container resources live exactly as long as the app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from dependency_injector import containers, providers
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from di_request_scope import container_lifespan


def build(events: list[str], **kwargs: Any) -> tuple[Starlette, Any]:
    def sync_pool() -> Iterator[str]:
        events.append("sync pool opened")
        yield "sync pool"
        events.append("sync pool closed")

    async def async_pool() -> AsyncIterator[str]:
        events.append("async pool opened")
        yield "async pool"
        events.append("async pool closed")

    class Container(containers.DeclarativeContainer):
        sync = providers.Resource(sync_pool)
        other = providers.Resource(async_pool)

    container = Container()

    async def index(request: Request) -> JSONResponse:
        events.append("request")
        return JSONResponse({"sync": container.sync(), "state": getattr(request.state, "user_state", None)})

    app = Starlette(routes=[Route("/", index)], lifespan=container_lifespan(container, **kwargs))
    return app, container


def test_resources_open_at_startup_and_close_at_shutdown_in_a_starlette_app() -> None:
    """Sync and async resources are initialised before the first request and shut down after the last."""
    events: list[str] = []
    app, _ = build(events)
    with TestClient(app) as client:
        assert sorted(events) == ["async pool opened", "sync pool opened"]
        assert client.get("/").json()["sync"] == "sync pool"
    assert events[2] == "request"
    assert sorted(events[3:]) == ["async pool closed", "sync pool closed"]


def test_an_existing_lifespan_runs_inside_and_its_state_reaches_requests() -> None:
    """A wrapped lifespan starts after the resources and stops before them; its state is kept."""
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, str]]:
        events.append("app started")
        yield {"user_state": "from lifespan"}
        events.append("app stopped")

    app, _ = build(events, lifespan=lifespan)
    with TestClient(app) as client:
        assert client.get("/").json()["state"] == "from lifespan"
    assert events.index("app started") > max(
        events.index("sync pool opened"), events.index("async pool opened")
    )
    assert events.index("app stopped") < min(
        events.index("sync pool closed"), events.index("async pool closed")
    )
