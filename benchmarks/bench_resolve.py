"""Micro benchmarks: resolving a request-scoped instance, and a whole scope's life.

(a) cached resolution: the scope is open and the instance exists; time one more
    resolution of it. Baseline: dependency-injector's ``providers.Singleton``
    call, the cheapest cached lookup a dependency-injector user has today.
(b) a fresh scope + one creation + its teardown, synchronously. Baseline: the
    same generator driven by hand (create, ``next``, ``next``), the floor.
(c) the same with async scopes, as a request would use them.

Every library creates the instance with the same generator function (code after
``yield`` is the teardown), so the work besides the library is identical.
Each candidate is checked once before timing: the cached lookups return the
instance they created, and every scope really ran its teardown.

APIs used (read from the installed sources):
  dishka 1.10       ``make_container(provider)``, ``with container() as req: req.get(T)``
                    (sync; a request container has no lock by default,
                    ``container(lock_factory=threading.Lock)`` gives it one);
                    async: ``make_async_container``, ``await req.get(T)``.
  wireup 2.13       ``@injectable(lifetime="scoped")`` on a generator factory,
                    ``create_sync_container(injectables=[...])``,
                    ``with container.enter_scope() as scope: scope.get(T)``;
                    async: ``create_async_container``, ``await scope.get(T)``.
  svcs 26.2         ``Registry.register_factory(T, gen)``, ``with Container(registry) as c: c.get(T)``
                    (``async with`` runs ``aclose()``).
  that-depends 4.2  ``providers.ContextResource(gen)`` in a ``BaseContainer``,
                    ``with container_context(Container): provider.resolve_sync()``;
                    async: ``async with container_context(...)``, ``await provider.resolve()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Awaitable, Callable, Iterator

import anyio.to_thread
import dishka
import svcs
import wireup
from dependency_injector import providers
from that_depends import BaseContainer, container_context
from that_depends import providers as td_providers

from di_request_scope import RequestScoped, request_scope
from di_request_scope._scope import _to_thread  # private: the hop the first row pays

from ._harness import (
    Candidate,
    Result,
    Section,
    Settings,
    ameasure,
    async_timer,
    markdown_table,
    measure,
    sync_timer,
)

NAME = "resolve"


class _Probe:
    """Collects created instances while the candidates are checked; off (None) while timing."""

    made: list[Thing] | None = None


_probe = _Probe()


class Thing:
    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


def make_thing() -> Iterator[Thing]:
    """The one factory every library uses: create, hand out, tear down."""
    thing = Thing()
    if _probe.made is not None:
        _probe.made.append(thing)
    yield thing
    thing.closed = True


@wireup.injectable(lifetime="scoped")
def wireup_thing() -> Iterator[Thing]:
    # The same body as make_thing: wireup's decorator marks the function object itself.
    thing = Thing()
    if _probe.made is not None:
        _probe.made.append(thing)
    yield thing
    thing.closed = True


class TDContainer(BaseContainer):
    default_scope = None  # no named scope: the cheapest configuration, no scope checks
    thing = td_providers.ContextResource(make_thing)


def _noop() -> None:
    return None


def _dishka_provider() -> dishka.Provider:
    provider = dishka.Provider(scope=dishka.Scope.REQUEST)
    provider.provide(make_thing)
    return provider


def _svcs_registry() -> svcs.Registry:
    registry = svcs.Registry()
    registry.register_factory(Thing, make_thing)
    return registry


# --- checks (outside timing) ---------------------------------------------------------


def _check_cached(name: str, resolve: Callable[[], object], created: object) -> None:
    first, second = resolve(), resolve()
    if not (first is second is created):
        raise AssertionError(f"{name}: a cached resolution returned a different object")


def _check_fresh(name: str, once: Callable[[], object]) -> None:
    made: list[Thing] = []
    _probe.made = made
    try:
        once()
        once()
    finally:
        _probe.made = None
    _check_made(name, made)


def _check_made(name: str, made: list[Thing]) -> None:
    if len(made) != 2 or made[0] is made[1]:
        raise AssertionError(f"{name}: expected one new instance per scope, got {made}")
    if not all(t.closed for t in made):
        raise AssertionError(f"{name}: the scope did not run the instance's teardown")


async def _acheck_fresh(name: str, once: Callable[[], Awaitable[object]]) -> None:
    made: list[Thing] = []
    _probe.made = made
    try:
        await once()
        await once()
    finally:
        _probe.made = None
    _check_made(name, made)


# --- (a) cached resolution -------------------------------------------------------------


def cached_candidates(stack: contextlib.ExitStack) -> list[Candidate]:
    singleton = providers.Singleton(Thing)
    singleton()
    context_local = providers.ContextLocalSingleton(Thing)
    context_local()

    ours = RequestScoped(make_thing)
    stack.enter_context(request_scope())
    ours_instance = ours()
    _check_cached("di_request_scope", ours, ours_instance)

    dishka_container = dishka.make_container(_dishka_provider())
    stack.callback(dishka_container.close)
    dishka_request = stack.enter_context(dishka_container())
    dishka_get = functools.partial(dishka_request.get, Thing)
    _check_cached("dishka", dishka_get, dishka_get())

    wireup_container = wireup.create_sync_container(injectables=[wireup_thing])
    stack.callback(wireup_container.close)
    wireup_scope = stack.enter_context(wireup_container.enter_scope())
    wireup_get = functools.partial(wireup_scope.get, Thing)
    _check_cached("wireup", wireup_get, wireup_get())

    svcs_container = stack.enter_context(svcs.Container(_svcs_registry()))
    svcs_get = functools.partial(svcs_container.get, Thing)
    _check_cached("svcs", svcs_get, svcs_get())

    stack.enter_context(container_context(TDContainer))
    td_get = TDContainer.thing.resolve_sync
    _check_cached("that-depends", td_get, td_get())

    # Each runner calls the most direct callable each library offers for a cached
    # lookup: the provider itself, or a partial of `get(T)` (about 20 ns for the partial).
    return [
        Candidate("dependency-injector Singleton", sync_timer(singleton), "`provider()`"),
        Candidate("dependency-injector ContextLocalSingleton", sync_timer(context_local), "`provider()`"),
        Candidate("di_request_scope RequestScoped", sync_timer(ours), "`provider()` in `request_scope()`"),
        Candidate("dishka", sync_timer(dishka_get), "`request_container.get(T)`, sync container"),
        Candidate("wireup", sync_timer(wireup_get), "`scope.get(T)`, sync container"),
        Candidate("svcs", sync_timer(svcs_get), "`Container.get(T)`"),
        Candidate("that-depends", sync_timer(td_get), "`ContextResource.resolve_sync()`"),
    ]


# --- (b) fresh sync scope + creation + teardown ------------------------------------------


def fresh_sync_candidates(stack: contextlib.ExitStack) -> list[Candidate]:
    ours = RequestScoped(make_thing)
    ours_plain = RequestScoped(Thing)

    def floor() -> None:
        gen = make_thing()
        next(gen)
        next(gen, None)

    def ours_scope() -> None:
        with request_scope():
            ours()

    def ours_plain_scope() -> None:
        with request_scope():
            ours_plain()

    dishka_container = dishka.make_container(_dishka_provider())
    stack.callback(dishka_container.close)

    def dishka_scope() -> None:
        with dishka_container() as request:
            request.get(Thing)

    def dishka_locked_scope() -> None:
        # A request container has no lock unless given one; ours always creates under one,
        # since a sync endpoint and its dependencies in the threadpool share the scope.
        with dishka_container(lock_factory=threading.Lock) as request:
            request.get(Thing)

    wireup_container = wireup.create_sync_container(injectables=[wireup_thing])
    stack.callback(wireup_container.close)

    def wireup_scope() -> None:
        with wireup_container.enter_scope() as scope:
            scope.get(Thing)

    registry = _svcs_registry()

    def svcs_scope() -> None:
        with svcs.Container(registry) as container:
            container.get(Thing)

    td_resolve = TDContainer.thing.resolve_sync

    def td_scope() -> None:
        with container_context(TDContainer):
            td_resolve()

    checked = {
        "hand-written generator": floor,
        "di_request_scope": ours_scope,
        "dishka": dishka_scope,
        "dishka, thread-safe": dishka_locked_scope,
        "wireup": wireup_scope,
        "svcs": svcs_scope,
        "that-depends": td_scope,
    }
    for name, once in checked.items():
        _check_fresh(name, once)
    return [
        Candidate("hand-written generator", sync_timer(floor), "`next(gen)` twice, no library"),
        Candidate("di_request_scope", sync_timer(ours_scope), "`with request_scope(): provider()`"),
        Candidate(
            "di_request_scope, no teardown",
            sync_timer(ours_plain_scope),
            "`RequestScoped(Thing)`: a plain class, no finalizer",
        ),
        Candidate("dishka", sync_timer(dishka_scope), "`with container() as r: r.get(T)`"),
        Candidate(
            "dishka, thread-safe",
            sync_timer(dishka_locked_scope),
            "`container(lock_factory=threading.Lock)`: creation under a lock, as di_request_scope's is",
        ),
        Candidate("wireup", sync_timer(wireup_scope), "`with c.enter_scope() as s: s.get(T)`"),
        Candidate("svcs", sync_timer(svcs_scope), "`with Container(reg) as c: c.get(T)`"),
        Candidate("that-depends", sync_timer(td_scope), "`with container_context(C): p.resolve_sync()`"),
    ]


# --- (c) fresh async scope + creation + teardown -----------------------------------------


async def measure_fresh_async(settings: Settings) -> list[Result]:
    ours = RequestScoped(make_thing)
    ours_plain = RequestScoped(Thing)

    async def floor() -> None:
        gen = make_thing()
        next(gen)
        next(gen, None)

    async def ours_scope() -> None:
        async with request_scope():
            ours()

    async def ours_plain_scope() -> None:
        async with request_scope():
            ours_plain()

    dishka_container = dishka.make_async_container(_dishka_provider())

    async def dishka_scope() -> None:
        async with dishka_container() as request:
            await request.get(Thing)

    wireup_container = wireup.create_async_container(injectables=[wireup_thing])

    async def wireup_scope() -> None:
        async with wireup_container.enter_scope() as scope:
            await scope.get(Thing)

    registry = _svcs_registry()

    async def svcs_scope() -> None:
        async with svcs.Container(registry) as container:
            container.get(Thing)

    td_resolve = TDContainer.thing.resolve

    async def thread_hop() -> None:
        await anyio.to_thread.run_sync(_noop)

    async def our_thread_hop() -> None:
        await _to_thread(_noop)

    async def td_scope() -> None:
        async with container_context(TDContainer):
            await td_resolve()

    checked = {
        "hand-written generator": floor,
        "di_request_scope": ours_scope,
        "dishka": dishka_scope,
        "wireup": wireup_scope,
        "svcs": svcs_scope,
        "that-depends": td_scope,
    }
    for name, once in checked.items():
        await _acheck_fresh(name, once)
    candidates = [
        Candidate("hand-written generator", async_timer(floor), "in a coroutine, no library"),
        Candidate(
            "di_request_scope",
            async_timer(ours_scope),
            "`async with request_scope(): provider()`; sync teardown runs in a worker thread",
        ),
        Candidate(
            "di_request_scope, no teardown",
            async_timer(ours_plain_scope),
            "`RequestScoped(Thing)`: no finalizer, no thread",
        ),
        Candidate("dishka", async_timer(dishka_scope), "`async with container() as r: await r.get(T)`"),
        Candidate("wireup", async_timer(wireup_scope), "`async with c.enter_scope() as s: await s.get(T)`"),
        Candidate("svcs", async_timer(svcs_scope), "`async with Container(reg) as c: c.get(T)`"),
        Candidate(
            "that-depends", async_timer(td_scope), "`async with container_context(C): await p.resolve()`"
        ),
        Candidate(
            "one thread hop (reference)",
            async_timer(thread_hop),
            "`await anyio.to_thread.run_sync(noop)`: what FastAPI pays per sync call",
        ),
        Candidate(
            "one thread hop of di_request_scope (reference)",
            async_timer(our_thread_hop),
            "what the scope pays to run a blocking teardown step or commit off the loop",
        ),
    ]
    try:
        return await ameasure(candidates, candidates[0].name, settings)
    finally:
        await dishka_container.close()
        await wireup_container.close()


def run(settings: Settings) -> list[Section]:
    sections = []
    micro = settings if settings.smoke else settings.scaled(0.5)
    with contextlib.ExitStack() as stack:
        candidates = cached_candidates(stack)
        baseline = candidates[0].name
        results = measure(candidates, baseline, micro)
    sections.append(
        Section(
            "Resolve (a): cached resolution of an existing scoped instance",
            "The scope is open and the instance already exists; one more resolution is timed.",
            markdown_table(results, baseline, micro),
        )
    )
    with contextlib.ExitStack() as stack:
        candidates = fresh_sync_candidates(stack)
        baseline = candidates[0].name
        results = measure(candidates, baseline, micro)
    sections.append(
        Section(
            "Resolve (b): open a scope, create one instance, tear it down (sync)",
            "One scope per call: enter, resolve once (the generator runs to `yield`), exit (teardown).",
            markdown_table(results, baseline, micro),
        )
    )
    results = asyncio.run(measure_fresh_async(micro))
    baseline = results[0].name
    sections.append(
        Section(
            "Resolve (c): the same with an async scope (as a request uses it)",
            "`async with` scopes on one event loop. di_request_scope runs sync teardown (a "
            "`Session.close()`) in a worker thread so it cannot block the loop; the row without "
            "teardown shows the scope alone.",
            markdown_table(results, baseline, micro),
        )
    )
    return sections
