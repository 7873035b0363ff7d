"""Soak: memory stays flat over many in-process requests; no scope, session or service outlives its request.

Requests are ASGI calls straight into the app (no server, no client): the
middleware, a ``RequestScoped(unit_of_work, ...)`` session, a repository and a
service per request, a row written and read back. Three out of four requests go
to an async endpoint that queries on the event loop, one to a sync endpoint
whose session is created and used in worker threads (FastAPI's threadpool).

After a warm-up (caches filled, pool connected), the run is cut into checkpoints.
At each one, after ``gc.collect()``, the test records:

- the bytes still held by what the last window of requests allocated
  (``tracemalloc`` runs during that window only: it slows every allocation);
- ``sys.getallocatedblocks()``, Python's count of live memory blocks;
- the resident set size (Linux ``/proc/self/statm``);
- how many ``RequestScope``, ``Session``, repository, service and row objects are alive.

A request that kept a single object (a closure, a list entry) would retain at
least 24 bytes and one block per request: over a window of ``WINDOW`` requests
that is more than ``WINDOW_BYTES``, and over the run more than ``BLOCKS`` blocks.
"""

import asyncio
import gc
import os
import sys
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dependency_injector import providers
from sqlalchemy.orm import Session, sessionmaker

from di_request_scope import RequestScope

from . import load_app
from .conftest import SOAK

REQUESTS = 100_000 if SOAK else 1_000  # after the warm-up
CHECKPOINTS = 10 if SOAK else 5
WARMUP = 2_000 if SOAK else 300
WINDOW = 2_000 if SOAK else 100  # requests traced before each checkpoint
# Two things hold memory from a window and are no leak: Python's sqlite3 keeps a
# weak reference per cursor and prunes them every 200 cursors (up to 200 x 88
# bytes), and weakref.finalize's registry reallocates its table as entries come
# and go (18 KiB). A request keeping one object of 48 bytes or more exceeds
# this over a soak window; in CI, BLOCKS is the bound a leak exceeds.
WINDOW_BYTES = 64 * 1024
BLOCKS = 2_000 if SOAK else 600  # a leak adds at least one block per request: REQUESTS blocks
RSS_BYTES = 16 * 1024 * 1024  # generous: the allocator keeps freed arenas; a real leak grows without end


@dataclass
class Checkpoint:
    requests: int
    window_bytes: int
    blocks: int
    rss: int
    alive: dict[str, int]


def rss() -> int:
    """The resident set size in bytes; 0 where /proc is missing (the RSS check is then skipped)."""
    try:
        pages = Path("/proc/self/statm").read_text().split()[1]
    except OSError:
        return 0
    return int(pages) * os.sysconf("SC_PAGE_SIZE")


KINDS: dict[type, str] = {
    RequestScope: "RequestScope",
    Session: "Session",
    load_app.MarkerRepository: "MarkerRepository",
    load_app.MarkerService: "MarkerService",
    load_app.Marker: "Marker",
}


def of_kinds() -> Iterator[Any]:
    return (obj for obj in gc.get_objects() if type(obj) in KINDS)


def alive(before: "weakref.WeakSet[Any]") -> dict[str, int]:
    """Live objects of the kinds a request creates, found through the garbage collector.

    Objects alive before the soak started (other tests' apps and failures) are not counted.
    """
    counts = dict.fromkeys(KINDS.values(), 0)
    for obj in of_kinds():
        if obj not in before:
            counts[KINDS[type(obj)]] += 1
    return counts


def http_scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def call(app: Any, path: str) -> int:
    """One request, the way a server makes it: the body, then a receive() that waits for a disconnect."""
    statuses: list[int] = []
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(http_scope(path), receive, send)
    return statuses[0]


async def run(app: Any, start: int, count: int) -> None:
    for n in range(start, start + count):
        path = f"/sync/m{n}" if n % 4 == 0 else f"/inline/m{n}"
        status = await call(app, path)
        assert status == 200, (path, status)


@pytest.mark.anyio
async def test_memory_and_live_objects_stay_flat_over_many_requests(
    tmp_path: Path, figures: list[str]
) -> None:
    """After warm-up: no growth in retained bytes, memory blocks or RSS; no request object outlives it."""
    container = load_app.Container()
    container.config.from_dict({"url": f"sqlite:///{tmp_path / 'soak.sqlite3'}", "pool_size": 1})
    # A plain sessionmaker: the ledger of the load tests keeps a record per request on purpose.
    container.session_factory.override(providers.Singleton(sessionmaker, bind=container.engine))
    container.wire(modules=[load_app])
    app = load_app.create_app(container)
    gc.collect()
    before = weakref.WeakSet(of_kinds())
    checkpoints: list[Checkpoint] = []
    chunk = REQUESTS // CHECKPOINTS
    started = time.perf_counter()
    try:
        async with app.app.router.lifespan_context(app.app):
            await run(app, 0, WARMUP)
            done = WARMUP
            for _ in range(CHECKPOINTS + 1):  # the first checkpoint is the baseline
                if checkpoints:
                    await run(app, done, chunk - WINDOW)
                    done += chunk - WINDOW
                gc.collect()
                tracemalloc.start()
                try:
                    await run(app, done, WINDOW)
                    done += WINDOW
                    gc.collect()
                    window_bytes = tracemalloc.get_traced_memory()[0]
                finally:
                    tracemalloc.stop()
                checkpoints.append(
                    Checkpoint(done, window_bytes, sys.getallocatedblocks(), rss(), alive(before))
                )
            checked_out = container.engine().pool.checkedout()
    finally:
        container.unwire()
    elapsed = time.perf_counter() - started

    for checkpoint in checkpoints:
        assert all(count == 0 for count in checkpoint.alive.values()), checkpoint
        assert checkpoint.window_bytes < WINDOW_BYTES, checkpoint
    baseline, last = checkpoints[0], checkpoints[-1]
    block_growth = max(c.blocks for c in checkpoints) - baseline.blocks
    rss_growth = max(c.rss for c in checkpoints) - baseline.rss
    assert block_growth < BLOCKS, [c.blocks for c in checkpoints]
    assert rss_growth < RSS_BYTES, [c.rss for c in checkpoints]
    assert checked_out == 0
    gc.collect()
    assert alive(before) == dict.fromkeys(baseline.alive, 0)

    measured = last.requests - WARMUP
    figures.append(
        f"soak, in-process: {measured} requests after {WARMUP} of warm-up, {elapsed:.1f} s in all, "
        f"{last.requests / elapsed:.0f} req/s; "
        f"retained per window of {WINDOW}: max {max(c.window_bytes for c in checkpoints)} B; "
        f"memory blocks {block_growth:+d}; RSS {rss_growth / 1024:+.0f} KiB "
        f"(baseline {baseline.rss / 1024 / 1024:.1f} MiB); live scopes/sessions/services after: 0"
    )
