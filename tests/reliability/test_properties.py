"""Property-based tests: random interleavings of scopes, threads, tasks, resolutions, overrides and failures.

Hypothesis writes a program of steps for a few "requests" (workers, each with a
context of its own) and runs it step by step, each step on a thread (or, in the
async test, in a task) it chose. Real concurrency enters through bursts: one
provider resolved by several threads or tasks at once. Whatever the program,

- a scope holds one instance per provider, wherever it is resolved from
  (threads, tasks, factories), and no instance is ever seen in another scope;
- each instance is torn down exactly once, when its scope closes, in reverse
  creation order, with the scope's first recorded failure; a failing teardown
  stops none of the others;
- after its scope closed, and outside any scope, an instance is not reachable:
  resolving raises ``NoRequestScopeError``;
- an override decides what is resolved while it lasts, and creates nothing.

The CI runs a bounded number of examples; ``python3 dev.py soak`` uses the
``di-request-scope-soak`` Hypothesis profile, with many more.
"""

import asyncio
import contextvars
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from dependency_injector import providers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from di_request_scope import (
    NoRequestScopeError,
    RequestScope,
    RequestScoped,
    TeardownError,
    current_scope,
    request_scope,
)

from .conftest import SOAK

settings.register_profile(
    "di-request-scope", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "di-request-scope-soak", max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile("di-request-scope-soak" if SOAK else "di-request-scope")

WORKERS = 2  # requests in flight at once; each starts the next when it ends
THREADS = 3  # worker threads steps may run on, besides the test's own thread
BURST = 4  # threads or tasks resolving one provider at the same moment
WAIT = 30


class InitializerError(Exception):
    """Raised by an initializer told to fail: the resolution fails, nothing is kept."""


class FinalizerError(Exception):
    """Raised by a teardown told to fail; the other teardowns still run."""


@dataclass(eq=False)
class Item:
    """A request-scoped instance: which provider made it, in which scope, in what order."""

    name: str
    scope: RequestScope
    serial: int
    dependency: Any = None
    explode: bool = False


@dataclass(eq=False)
class Pair:
    """Built by a Factory from two request-scoped providers."""

    a: Any
    b: Any


@dataclass
class Log:
    """What the initializers saw, keyed by scope; shared by every thread of an example."""

    created: dict[RequestScope, list[Item]] = field(default_factory=dict)
    torn_down: dict[RequestScope, list[tuple[Item, BaseException | None]]] = field(default_factory=dict)
    fail_next: set[str] = field(default_factory=set)
    serials: Iterator[int] = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, name: str, dependency: Any = None) -> Item:
        scope = current_scope()
        with self.lock:
            if name in self.fail_next:
                self.fail_next.discard(name)
                raise InitializerError(name)
            item = Item(name, scope, next(self.serials), dependency)
            self.created.setdefault(scope, []).append(item)
        return item

    def tear_down(self, item: Item, failure: BaseException | None) -> None:
        with self.lock:
            self.torn_down.setdefault(item.scope, []).append((item, failure))
        if item.explode:
            raise FinalizerError(item.name)


def sync_initializer(log: Log, name: str) -> Any:
    def initializer(dependency: Any = None) -> Iterator[Item]:
        item = log.create(name, dependency)
        try:
            yield item
        except BaseException as exc:
            log.tear_down(item, exc)
            raise
        log.tear_down(item, None)

    return initializer


def async_initializer(log: Log, name: str) -> Any:
    async def initializer(dependency: Any = None) -> AsyncIterator[Item]:
        await asyncio.sleep(0)  # a real suspension point: other tasks run during the creation
        item = log.create(name, dependency)
        try:
            yield item
        except BaseException as exc:
            log.tear_down(item, exc)
            raise
        log.tear_down(item, None)

    return initializer


@dataclass
class Providers:
    """``a``; ``b`` depends on ``a``; ``pair`` is a Factory of both; ``a`` may be overridden."""

    a: RequestScoped[Any]
    b: RequestScoped[Any]
    pair: providers.Factory[Pair]
    sentinel: object = field(default_factory=object)

    @classmethod
    def build(cls, log: Log, initializer: Any) -> "Providers":
        a = RequestScoped(initializer(log, "a"))
        b = RequestScoped(initializer(log, "b"), a)
        return cls(a, b, providers.Factory(Pair, a=a, b=b))

    def named(self, name: str) -> Any:
        return {"a": self.a, "b": self.b}[name]


@dataclass
class OpenScope:
    """The model of one open scope: what resolving each provider must return."""

    opener: request_scope
    scope: RequestScope
    instances: dict[str, Item] = field(default_factory=dict)
    failure: BaseException | None = None


@dataclass
class Model:
    log: Log
    providers: Providers
    stacks: list[list[OpenScope]]  # per worker, innermost last
    overridden: bool = False
    stale: list[tuple[contextvars.Context, str]] = field(default_factory=list)  # contexts of closed scopes

    def created_so_far(self, worker: int) -> int:
        return len(self.log.created.get(self.stacks[worker][-1].scope, []))

    def register(self, worker: int, before: int) -> None:
        """Take in the instances a resolution created: at most one per provider per scope, ever."""
        scope = self.stacks[worker][-1]
        for item in self.log.created.get(scope.scope, [])[before:]:
            assert item.name not in scope.instances, f"a second {item.name} in one scope"
            scope.instances[item.name] = item

    def expect(self, worker: int, name: str, got: Any) -> None:
        """``got`` is what resolving ``name`` in ``worker``'s innermost scope must give."""
        if name == "a" and self.overridden:
            assert got is self.providers.sentinel
            return
        scope = self.stacks[worker][-1]
        assert got is scope.instances[name]  # the scope's one instance, made in this scope
        assert got.scope is scope.scope
        if name == "b":  # made from this scope's a, or from the override active then
            assert got.dependency is self.providers.sentinel or got.dependency is scope.instances["a"]

    def check_closed(self, closed: OpenScope, raised: BaseException | None) -> None:
        created = self.log.created.get(closed.scope, [])
        torn_down = self.log.torn_down.get(closed.scope, [])
        assert [item for item, _ in torn_down] == created[::-1]  # once each, newest first
        assert all(failure is closed.failure for _, failure in torn_down)
        exploded = [item for item in created if item.explode]
        if not exploded:
            assert raised is None
        elif len(exploded) == 1:
            assert isinstance(raised, FinalizerError)
        else:
            assert isinstance(raised, TeardownError)
            assert len(raised.errors) == len(exploded)


# --------------------------------------------------------------------------------------------------
# Threads.
# --------------------------------------------------------------------------------------------------

worker_ids = st.integers(0, WORKERS - 1)
thread_ids = st.integers(0, THREADS)  # 0: the test's own thread
provider_names = st.sampled_from(["a", "b"])
resolutions = st.tuples(st.just("resolve"), worker_ids, thread_ids, provider_names)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("open"), worker_ids, thread_ids),  # a nested scope
        st.tuples(
            st.just("close"), worker_ids, thread_ids
        ),  # the innermost; the request's end opens the next
        resolutions,
        resolutions,
        resolutions,
        st.tuples(st.just("burst"), worker_ids, provider_names),
        st.tuples(st.just("factory"), worker_ids, thread_ids),
        st.tuples(st.just("fail"), worker_ids),
        st.tuples(st.just("fail-creation"), provider_names),
        st.tuples(st.just("explode"), worker_ids, provider_names),
        st.tuples(st.just("override"), st.booleans()),
        st.tuples(st.just("stale"), st.integers(0, 5)),
        st.just(("outside",)),
    ),
    min_size=6,
    max_size=40,
)


@pytest.fixture(scope="module")
def threads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=max(THREADS, BURST)) as pool:
        yield pool


@settings(PROFILE)
@given(steps=STEPS)
def test_scopes_on_threads_keep_their_invariants_whatever_the_interleaving(
    threads: ThreadPoolExecutor, steps: list[tuple[Any, ...]]
) -> None:
    """Any program of steps over three requests and four threads keeps every invariant."""
    log = Log()
    model = Model(log, Providers.build(log, sync_initializer), [[] for _ in range(WORKERS)])
    contexts = [contextvars.Context() for _ in range(WORKERS)]

    def on(thread: int, context: contextvars.Context, func: Any, *args: Any) -> Any:
        """Run ``func`` in ``context`` on the chosen thread and wait: steps never overlap."""
        if thread == 0:
            return context.run(func, *args)
        return threads.submit(context.run, func, *args).result(WAIT)

    def resolve(worker: int, thread: int, name: str) -> None:
        before, flags = model.created_so_far(worker), set(log.fail_next)
        failed: set[str] = set()
        try:
            got = on(thread, contexts[worker], model.providers.named(name))
        except InitializerError as exc:
            failed, got = {exc.args[0]}, None
        assert failed == flags - log.fail_next  # an initializer told to fail failed, once
        model.register(worker, before)
        if got is not None:
            model.expect(worker, name, got)

    def close(worker: int, thread: int) -> None:
        stale = contexts[worker].copy()  # a task or thread that kept the request's context
        top = model.stacks[worker].pop()
        raised: BaseException | None = None
        try:
            on(thread, contexts[worker], top.opener.__exit__, None, None, None)
        except (FinalizerError, TeardownError) as exc:
            raised = exc
        model.check_closed(top, raised)
        model.stale.extend((stale, name) for name in top.instances)

    def open_scope(worker: int, thread: int) -> None:
        opener = request_scope()
        model.stacks[worker].append(OpenScope(opener, on(thread, contexts[worker], opener.__enter__)))

    try:
        for worker in range(WORKERS):
            open_scope(worker, 0)
        for step in steps:
            op = step[0]
            if op == "open":
                open_scope(step[1], step[2])
            elif op == "close":
                close(step[1], step[2])
                if not model.stacks[step[1]]:
                    open_scope(step[1], step[2])  # the worker's next request
            elif op == "resolve":
                resolve(*step[1:])
            elif op == "burst" and not log.fail_next:
                _, worker, name = step
                barrier = threading.Barrier(BURST)

                def together(provider: Any = model.providers.named(name), barrier: Any = barrier) -> Any:
                    barrier.wait(WAIT)
                    return provider()

                before = model.created_so_far(worker)
                copies = [contexts[worker].copy() for _ in range(BURST)]  # like FastAPI's threadpool
                results = [f.result(WAIT) for f in [threads.submit(c.run, together) for c in copies]]
                assert all(r is results[0] for r in results)  # concurrent first resolutions: one instance
                model.register(worker, before)
                model.expect(worker, name, results[0])
            elif op == "factory" and not log.fail_next:
                _, worker, thread = step
                before = model.created_so_far(worker)
                pair = on(thread, contexts[worker], model.providers.pair)
                model.register(worker, before)
                model.expect(worker, "a", pair.a)
                model.expect(worker, "b", pair.b)
            elif op == "fail":
                top = model.stacks[step[1]][-1]
                error = RuntimeError(f"request {step[1]} failed")
                top.scope.fail(error)
                top.failure = top.failure or error
            elif op == "fail-creation":
                log.fail_next.add(step[1])
            elif op == "explode":
                item = model.stacks[step[1]][-1].instances.get(step[2])
                if item is not None:
                    item.explode = True
            elif op == "override":
                if step[1] and not model.overridden:
                    model.providers.a.override(providers.Object(model.providers.sentinel))
                elif not step[1] and model.overridden:
                    model.providers.a.reset_override()
                model.overridden = step[1]
            elif op == "stale" and model.stale:
                stale, name = model.stale[step[1] % len(model.stale)]
                if name == "a" and model.overridden:
                    assert stale.run(model.providers.a) is model.providers.sentinel
                else:
                    with pytest.raises(NoRequestScopeError, match="already closed"):
                        stale.run(model.providers.named(name))
            elif op == "outside":
                with pytest.raises(NoRequestScopeError, match="outside a request scope"):
                    contextvars.Context().run(model.providers.b)
        for worker in range(WORKERS):
            while model.stacks[worker]:
                close(worker, 0)
    finally:
        if model.overridden:
            model.providers.a.reset_override()

    created = [item for items in log.created.values() for item in items]
    torn_down = [item for items in log.torn_down.values() for item, _ in items]
    assert sorted(map(id, created)) == sorted(map(id, torn_down))  # every instance torn down exactly once


# --------------------------------------------------------------------------------------------------
# asyncio tasks.
# --------------------------------------------------------------------------------------------------

async_resolutions = st.tuples(st.just("resolve"), worker_ids, provider_names)
ASYNC_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("open"), worker_ids),
        st.tuples(st.just("close"), worker_ids),
        async_resolutions,
        async_resolutions,
        st.tuples(st.just("burst"), worker_ids, provider_names),
        st.tuples(st.just("child-task"), worker_ids, provider_names),
        st.tuples(st.just("factory"), worker_ids),
        st.tuples(st.just("fail"), worker_ids),
        st.tuples(st.just("fail-creation"), provider_names),
        st.tuples(st.just("explode"), worker_ids, provider_names),
        st.tuples(st.just("override"), st.booleans()),
        st.tuples(st.just("stale"), st.integers(0, 5)),
    ),
    min_size=6,
    max_size=40,
)


class Request:
    """A task standing for one request: it runs the steps it is sent, in its own context."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        while True:
            step, reply = await self.inbox.get()
            try:
                reply.set_result(await step())
            except Exception as exc:
                reply.set_exception(exc)

    async def run(self, step: Any) -> Any:
        reply = asyncio.get_running_loop().create_future()
        await self.inbox.put((step, reply))
        return await asyncio.wait_for(reply, WAIT)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@settings(PROFILE)
@given(steps=ASYNC_STEPS)
def test_scopes_on_asyncio_tasks_keep_their_invariants_whatever_the_interleaving(
    steps: list[tuple[Any, ...]],
) -> None:
    """Async instances, requests as tasks, concurrent awaits, child tasks: the same invariants hold."""
    asyncio.run(run_async_program(steps))


async def run_async_program(steps: list[tuple[Any, ...]]) -> None:
    log = Log()
    model = Model(log, Providers.build(log, async_initializer), [[] for _ in range(WORKERS)])
    sentinel = providers.Object(model.providers.sentinel)
    sentinel.enable_async_mode()  # stands in for an async provider: awaited like it
    requests = [Request() for _ in range(WORKERS)]

    async def resolve_in(worker: int, awaitables: Any) -> list[Any]:
        """Run the resolutions in ``worker``'s task; take in what they created."""
        before, flags = model.created_so_far(worker), set(log.fail_next)
        results: list[Any] = await requests[worker].run(
            lambda: asyncio.gather(*awaitables(), return_exceptions=True)
        )
        failed = {r.args[0] for r in results if isinstance(r, InitializerError)}
        assert failed <= flags - log.fail_next  # only an initializer told to fail failed
        model.register(worker, before)
        return results

    async def close(worker: int) -> None:
        top = model.stacks[worker].pop()

        async def exit_scope() -> tuple[contextvars.Context, BaseException | None]:
            stale = contextvars.copy_context()  # a task that kept the request's context
            try:
                await top.opener.__aexit__(None, None, None)
            except (FinalizerError, TeardownError) as exc:
                return stale, exc
            return stale, None

        stale, raised = await requests[worker].run(exit_scope)
        model.check_closed(top, raised)
        model.stale.extend((stale, name) for name in top.instances)

    async def open_scope(worker: int) -> None:
        opener = request_scope()
        model.stacks[worker].append(OpenScope(opener, await requests[worker].run(opener.__aenter__)))

    try:
        for worker in range(WORKERS):
            await open_scope(worker)
        for step in steps:
            op = step[0]
            if op == "open":
                await open_scope(step[1])
            elif op == "close":
                await close(step[1])
                if not model.stacks[step[1]]:
                    await open_scope(step[1])  # the worker's next request
            elif op in ("resolve", "burst", "child-task"):
                _, worker, name = step
                provider = model.providers.named(name)
                if op == "resolve":
                    results = await resolve_in(worker, lambda p=provider: [p()])
                elif op == "burst":  # concurrent first resolutions in one request
                    if log.fail_next:
                        continue
                    results = await resolve_in(worker, lambda p=provider: [p() for _ in range(BURST)])
                else:  # a task the request starts copies its context, scope included
                    results = await resolve_in(worker, lambda p=provider: [asyncio.ensure_future(p())])
                got = [r for r in results if not isinstance(r, InitializerError)]
                assert all(r is got[0] for r in got)
                for r in got:
                    model.expect(worker, name, r)
            elif op == "factory" and not log.fail_next:
                (pair,) = await resolve_in(step[1], lambda: [model.providers.pair()])
                model.expect(step[1], "a", pair.a)
                model.expect(step[1], "b", pair.b)
            elif op == "fail":
                top = model.stacks[step[1]][-1]
                error = RuntimeError(f"request {step[1]} failed")
                top.scope.fail(error)
                top.failure = top.failure or error
            elif op == "fail-creation":
                log.fail_next.add(step[1])
            elif op == "explode":
                item = model.stacks[step[1]][-1].instances.get(step[2])
                if item is not None:
                    item.explode = True
            elif op == "override":
                if step[1] and not model.overridden:
                    model.providers.a.override(sentinel)
                elif not step[1] and model.overridden:
                    model.providers.a.reset_override()
                model.overridden = step[1]
            elif op == "stale" and model.stale:
                stale, name = model.stale[step[1] % len(model.stale)]
                provider = model.providers.named(name)
                if name == "a" and model.overridden:
                    assert await stale.run(provider) is model.providers.sentinel
                else:
                    with pytest.raises(NoRequestScopeError, match="already closed"):
                        await stale.run(provider)
        for worker in range(WORKERS):
            while model.stacks[worker]:
                await close(worker)
    finally:
        if model.overridden:
            model.providers.a.reset_override()
        for request in requests:
            await request.stop()

    created = [item for items in log.created.values() for item in items]
    torn_down = [item for items in log.torn_down.values() for item, _ in items]
    assert sorted(map(id, created)) == sorted(map(id, torn_down))  # every instance torn down exactly once
