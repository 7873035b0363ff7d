"""Memory: what an open scope costs, and whether many scopes leave anything behind.

(1) Bytes per open scope beyond the objects it holds. N scopes are held open at
    once, each with one instance created by a generator (so each also holds its
    teardown); tracemalloc measures the growth, from which the cost of the same N
    instances with their suspended generators, created without any library, is
    subtracted. What is left is each library's bookkeeping per scope.
(2) Growth across many sequential scopes: after a warm-up, a tracemalloc
    snapshot, N ``request_scope()`` uses (each resolving one instance with a
    teardown), ``gc.collect()``, a second snapshot. Reported: the difference, and
    how many ``RequestScope`` objects are still alive (found with ``gc``).
    The same for requests through ``RequestScopeMiddleware``.

These figures are deterministic, not timings: no baseline ratio is needed.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dishka
import svcs
import wireup
from that_depends import BaseContainer, container_context
from that_depends import providers as td_providers

import di_request_scope
from di_request_scope import RequestScope, RequestScoped, RequestScopeMiddleware, request_scope

from ._harness import Section, Settings, table_of_rows

NAME = "memory"

_PACKAGE_DIR = str(Path(di_request_scope.__file__).parent)


class Thing:
    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


class Plain:
    """An instance with no teardown."""

    __slots__ = ("closed",)


def make_thing() -> Iterator[Thing]:
    thing = Thing()
    yield thing
    thing.closed = True


@wireup.injectable(lifetime="scoped")
def wireup_thing() -> Iterator[Thing]:
    thing = Thing()
    yield thing
    thing.closed = True


class BenchMemoryTDContainer(BaseContainer):
    default_scope = None
    thing = td_providers.ContextResource(make_thing)


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


# --- (1) bytes per open scope ---------------------------------------------------------------

# Each opener opens one scope, resolves one instance in it and returns (instance, closer).
Opener = Callable[[], tuple[object, Callable[[], object]]]


def _openers(stack: list[Callable[[], object]]) -> dict[str, tuple[Opener, str]]:
    ours = RequestScoped(make_thing)
    ours_plain = RequestScoped(Plain)

    def open_ours() -> tuple[object, Callable[[], object]]:
        scope = request_scope()
        scope.__enter__()
        return ours(), lambda: scope.__exit__(None, None, None)

    def open_ours_plain() -> tuple[object, Callable[[], object]]:
        scope = request_scope()
        scope.__enter__()
        return ours_plain(), lambda: scope.__exit__(None, None, None)

    provider = dishka.Provider(scope=dishka.Scope.REQUEST)
    provider.provide(make_thing)
    dishka_container = dishka.make_container(provider)
    stack.append(dishka_container.close)

    def open_dishka() -> tuple[object, Callable[[], object]]:
        request = dishka_container()
        request.__enter__()
        return request.get(Thing), request.close

    wireup_container = wireup.create_sync_container(injectables=[wireup_thing])
    stack.append(wireup_container.close)

    def open_wireup() -> tuple[object, Callable[[], object]]:
        scope = wireup_container.enter_scope()
        scope.__enter__()
        return scope.get(Thing), lambda: scope.__exit__(None, None, None)

    registry = svcs.Registry()
    registry.register_factory(Thing, make_thing)

    def open_svcs() -> tuple[object, Callable[[], object]]:
        container = svcs.Container(registry)
        return container.get(Thing), container.close

    td_resolve = BenchMemoryTDContainer.thing.resolve_sync

    def open_that_depends() -> tuple[object, Callable[[], object]]:
        context = container_context(BenchMemoryTDContainer)
        context.__enter__()
        return td_resolve(), lambda: context.__exit__(None, None, None)

    return {
        "di_request_scope": (open_ours, "nested `request_scope()`, `RequestScoped(generator)`"),
        "di_request_scope, no teardown": (open_ours_plain, "`RequestScoped(Plain)`: no finalizer"),
        "dishka": (open_dishka, "request containers, sync"),
        "wireup": (open_wireup, "`enter_scope()`, sync"),
        "svcs": (open_svcs, "`svcs.Container`"),
        "that-depends": (open_that_depends, "nested `container_context(C)`"),
    }


def _bytes_per_instance(n: int, *, generator: bool) -> float:
    """What N instances cost without any library: a Thing, plus its suspended generator."""
    held: list[Any] = [None] * n
    before = _traced()
    for i in range(n):
        if generator:
            gen = make_thing()
            held[i] = (next(gen), gen)
        else:
            held[i] = Plain()
    after = _traced()
    del held
    return (after - before) / n


def _bytes_per_scope(opener: Opener, n: int) -> float:
    instances: list[object] = [None] * n
    closers: list[Callable[[], object] | None] = [None] * n
    before = _traced()
    for i in range(n):
        instances[i], closers[i] = opener()
    after = _traced()
    for close in reversed(closers):  # nested scopes close innermost first
        if close is not None:
            close()
    if not all(getattr(t, "closed", True) for t in instances):
        raise AssertionError("a scope did not tear its instance down")
    return (after - before) / n


def open_scopes_table(n: int) -> str:
    closers: list[Callable[[], object]] = []
    rows = []
    tracemalloc.start()
    try:
        with_generator = _bytes_per_instance(n, generator=True)
        plain = _bytes_per_instance(n, generator=False)
        for name, (opener, note) in _openers(closers).items():
            _bytes_per_scope(opener, min(n, 100))  # warm caches before measuring
            total = _bytes_per_scope(opener, n)
            held = plain if name.endswith("no teardown") else with_generator
            rows.append([f"{name} — {note}", f"{total:,.0f}", f"{held:,.0f}", f"{total - held:,.0f}"])
    finally:
        tracemalloc.stop()
        for close in closers:
            close()
    return table_of_rows(
        [
            "library",
            "bytes per open scope, total",
            "of which the instance (+ its generator)",
            "scope's own bytes",
        ],
        rows,
    )


# --- (2) growth across sequential scopes ---------------------------------------------------


def _growth(label: str, uses: int, run_uses: Callable[[int], None]) -> list[str]:
    run_uses(min(1000, uses))  # warm-up: caches, free lists, first-use allocations
    tracemalloc.start(5)
    try:
        gc.collect()
        first = tracemalloc.take_snapshot()
        run_uses(uses)
        gc.collect()
        second = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<unknown>")]
    diff = second.filter_traces(ignore).compare_to(first.filter_traces(ignore), "lineno")
    growth = sum(d.size_diff for d in diff)
    ours = [d for d in diff if d.size_diff > 0 and d.traceback[0].filename.startswith(_PACKAGE_DIR)]
    site = "—"
    if ours:
        top = max(ours, key=lambda d: d.size_diff)
        frame = top.traceback[0]
        site = f"`{Path(frame.filename).name}:{frame.lineno}` {top.size_diff:+,} B"
    live = sum(1 for o in gc.get_objects() if type(o) is RequestScope)
    return [label, f"{uses:,}", f"{growth:+,}", f"{growth / uses:+.3f}", str(live), site]


def _sync_uses(n: int) -> None:
    provider = _GROWTH_PROVIDER
    for _ in range(n):
        with request_scope():
            provider()


def _async_uses(n: int) -> None:
    provider = _GROWTH_PROVIDER_PLAIN

    async def uses() -> None:
        for _ in range(n):
            async with request_scope():
                provider()

    asyncio.run(uses())


def _middleware_uses(n: int) -> None:
    provider = _GROWTH_PROVIDER

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        provider()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = RequestScopeMiddleware(app)
    scope_template = {"type": "http", "method": "GET", "path": "/", "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def requests() -> None:
        for _ in range(n):
            await middleware(dict(scope_template), receive, send)

    asyncio.run(requests())


_GROWTH_PROVIDER = RequestScoped(make_thing)
_GROWTH_PROVIDER_PLAIN = RequestScoped(Plain)


def growth_table(sync_uses: int, async_uses: int, requests: int) -> str:
    rows = [
        _growth("`with request_scope(): provider()` (generator instance)", sync_uses, _sync_uses),
        _growth("`async with request_scope(): provider()` (plain instance)", async_uses, _async_uses),
        _growth("`RequestScopeMiddleware`, raw ASGI app (generator instance)", requests, _middleware_uses),
    ]
    return table_of_rows(
        [
            "scenario",
            "uses",
            "traced growth after gc (bytes)",
            "bytes per use",
            "live RequestScope after",
            "largest growth in di_request_scope",
        ],
        rows,
        align="lrrrrl",
    )


def run(settings: Settings) -> list[Section]:
    n_open = 500 if settings.smoke else 10_000
    sync_uses = 2_000 if settings.smoke else 100_000
    async_uses = 1_000 if settings.smoke else 20_000
    requests = 200 if settings.smoke else 5_000
    return [
        Section(
            f"Memory (1): bytes per open scope, {n_open:,} scopes open at once",
            "Each scope holds one instance made by a generator (so it also holds a teardown). The instance "
            "and its suspended generator, measured alone, are subtracted: the last column is the scope's "
            "own bookkeeping.",
            open_scopes_table(n_open),
        ),
        Section(
            "Memory (2): growth across sequential scopes",
            "Traced memory after `gc.collect()`, compared with a snapshot taken after a warm-up. "
            "A few hundred bytes of noise (interpreter caches) are expected; growth proportional to the "
            "number of uses is a leak. The middleware's sync teardown runs in a worker thread, "
            "hence fewer requests.",
            growth_table(sync_uses, async_uses, requests),
        ),
    ]
