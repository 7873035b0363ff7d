"""The app from dependency-injector's issue: both parameters get one session, each request a new one.

The issue's users saw it break under concurrent load on sync endpoints, so the
last test runs it on a real uvicorn server with 50 requests in flight at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from examples.seed_issue_app import app

TOTAL, CONCURRENCY = 300, 50


@pytest.mark.parametrize("path", ["/", "/sync"])
def test_both_parameters_share_a_session_and_the_next_request_gets_a_new_one(path: str) -> None:
    with TestClient(app) as client:
        first, second = client.get(path).json(), client.get(path).json()
    assert first["session_1_id"] == first["session_2_id"]
    assert second["session_1_id"] == second["session_2_id"]
    assert first["session_key"] != second["session_key"]


class Gate:
    """ASGI wrapper holding the first `size` requests until that many are in flight together."""

    def __init__(self, app: Any, size: int) -> None:
        self.app = app
        self.size = size
        self.arrived = 0
        self.opened: asyncio.Event | None = None  # made on the server's event loop

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if self.opened is None:
                self.opened = asyncio.Event()
            self.arrived += 1
            if self.arrived == self.size:
                self.opened.set()
            await asyncio.wait_for(self.opened.wait(), timeout=60)  # a bound, not a delay
        await self.app(scope, receive, send)


async def load(url: str, path: str) -> list[dict[str, int]]:
    """TOTAL requests, CONCURRENCY of them in flight at any moment."""
    slots = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one() -> dict[str, int]:
            async with slots:
                response = await client.get(path)
            assert response.status_code == 200, response.text
            result: dict[str, int] = response.json()
            return result

        return await asyncio.gather(*(one() for _ in range(TOTAL)))


@pytest.mark.server
@pytest.mark.parametrize("path", ["/sync", "/"])
def test_under_concurrent_load_every_request_has_one_session_of_its_own(
    uvicorn_server: Any, path: str
) -> None:
    gate = Gate(app, CONCURRENCY)
    with uvicorn_server(gate) as server:
        results = asyncio.run(load(server.url, path))
    assert gate.opened is not None
    assert gate.opened.is_set()  # CONCURRENCY requests really were in flight at once
    assert len(results) == TOTAL
    assert all(r["session_1_id"] == r["session_2_id"] for r in results)
    assert len({r["session_key"] for r in results}) == TOTAL
