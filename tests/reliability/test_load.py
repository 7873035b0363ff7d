"""Load: thousands of requests, 100 at a time, on a real uvicorn server; no request sees another's data.

Half the requests go to a sync endpoint (FastAPI's threadpool), half to an async
one; each writes a marker of its own through a repository and a service that
share the request's ``RequestScoped(unit_of_work, ...)`` session, reads back what
its session wrote, and reports the session (``hash_key``) every injection point
got. The sessions record their own creation, commit, rollback and close
(``load_app.Ledger``), and the rows are counted through a connection of the
test's own afterwards.

The database pools are smaller than the load, as in production: 20 connections
on PostgreSQL, one on SQLite (one writer at a time; requests queue for the
connection instead of polling the file lock). So requests wait for connections
while FastAPI's 40 worker threads are all taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from . import load_app
from .conftest import SOAK

TOTAL = 20_000 if SOAK else 2_000
CONCURRENCY = 100
# httpcore scans every connection of a pool on each request, so one client with
# 100 connections spends more time in that scan than the server spends serving;
# ten clients of ten connections keep 100 requests in flight for a fraction.
CLIENTS = 10
WAIT = 60  # bounds a wait that only a bug would make long


async def drive(url: str, total: int, concurrency: int) -> list[tuple[str, httpx.Response]]:
    """``total`` POSTs, alternately to the sync and the async endpoint, ``concurrency`` in flight at once."""
    per_client = concurrency // CLIENTS
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    numbers = iter(range(total))
    results: list[tuple[str, httpx.Response]] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, limits=limits, timeout=WAIT))
            for _ in range(CLIENTS)
        ]

        async def worker(client: httpx.AsyncClient) -> None:
            for n in numbers:  # shared: each number is taken by exactly one worker
                marker = f"m{n}"
                kind = "sync" if n % 2 else "async"
                results.append((marker, await client.post(f"/{kind}/{marker}")))

        await asyncio.gather(*(worker(clients[i % CLIENTS]) for i in range(concurrency)))
    return results


@pytest.mark.server
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_every_request_under_load_gets_its_own_session_committed_once_and_closed(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, uvicorn_server: Any, figures: list[str]
) -> None:
    """2,000 requests, 100 in flight: zero cross-request leaks, one session each, all committed and closed."""
    if backend == "sqlite":
        url, pool_size = f"sqlite:///{tmp_path / 'load.sqlite3'}", 1
    else:
        url, pool_size = request.getfixturevalue("postgres_schema_url"), 20
    container = load_app.Container()
    container.config.from_dict({"url": url, "pool_size": pool_size})
    container.wire(modules=[load_app])
    app = load_app.create_app(container, gate=CONCURRENCY)
    ledger = container.ledger()
    try:
        # Keep-alive longer than any pause a loaded machine makes between two requests of one client.
        with uvicorn_server(app, timeout_keep_alive=WAIT) as server:
            started = time.perf_counter()
            results = asyncio.run(drive(server.url, TOTAL, CONCURRENCY))
            elapsed = time.perf_counter() - started
            # The last scopes close after their clients got the response.
            assert ledger.wait_closed(TOTAL, WAIT), f"{len(ledger.closed)} of {TOTAL} sessions closed"
            checked_out = container.engine().pool.checkedout()
    finally:
        container.unwire()

    assert app.opened is not None
    assert app.opened.is_set()  # the first CONCURRENCY requests were all in the app at once
    assert app.peak >= CONCURRENCY
    assert len(results) == TOTAL
    keys: dict[str, int] = {}
    for marker, response in results:
        assert response.status_code == 200, (marker, response.text)
        body = response.json()
        assert body["marker"] == marker
        assert body["owner"] == marker  # no other request stamped this session first
        assert body["read_back"] == [marker]  # its session wrote its marker and nothing else
        assert len(set(body["keys"])) == 1, body  # every injection point got one session
        keys[marker] = body["keys"][0]
    assert len(set(keys.values())) == TOTAL  # one session per request, never shared

    created = set(ledger.created)
    assert len(ledger.created) == len(created) == TOTAL
    assert created == set(keys.values())
    assert Counter(ledger.committed) == Counter(created)  # each session committed exactly once
    assert ledger.rolled_back == []
    assert Counter(ledger.closed) == Counter(created)  # and closed exactly once
    assert checked_out == 0

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(load_app.Marker.marker, load_app.Marker.session_key, func.count()).group_by(
                    load_app.Marker.marker, load_app.Marker.session_key
                )
            ).all()
    finally:
        engine.dispose()
    assert len(rows) == TOTAL
    assert {marker: (key, count) for marker, key, count in rows} == {
        marker: (key, 1) for marker, key in keys.items()
    }  # every marker committed exactly once, by the session of its own request

    figures.append(
        f"load, {backend} (pool {pool_size}): {TOTAL} requests, {CONCURRENCY} in flight, "
        f"{elapsed:.1f} s, {TOTAL / elapsed:.0f} req/s; leaks 0, sessions {len(created)} created = "
        f"committed = closed, checked out afterwards {checked_out}"
    )
