"""pytest fixtures for apps built on di_request_scope.

pytest loads this plugin through the ``pytest11`` entry point whenever the
package is installed. It stays inert until a test asks for one of its fixtures:
it imports nothing beyond the core package, and SQLAlchemy only when a
transaction fixture runs. ``-p no:di_request_scope`` turns it off.

Fixtures:

* ``di_scope``: the test function runs inside a ``request_scope()`` (sync tests,
  and async tests run by anyio's pytest plugin); its exception fails the scope.
* ``di_override``: override providers until the test ends (:class:`~di_request_scope.testing.Overrides`).
* ``di_engine``: define it yourself: the ``Engine`` or ``AsyncEngine`` of the test database.
* ``di_transaction`` / ``di_async_transaction``: a transaction on ``di_engine``, rolled
  back after the test; ``.bind(container.session_factory)`` puts the app's sessions in it.

.. versionadded:: 0.2.0
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .testing import AsyncRolledBackTransaction, Overrides, RolledBackTransaction

__all__ = ["di_async_transaction", "di_engine", "di_override", "di_scope", "di_transaction"]

_SCOPE_FIXTURE = "di_scope"


def _in_scope(test: Callable[..., Any]) -> Callable[..., Any]:
    """``test`` wrapped in a scope of its own, as ``@request_scope()`` would, keeping its kind."""
    from ._scope import request_scope

    if inspect.iscoroutinefunction(test):

        @functools.wraps(test)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            async with request_scope():
                return await test(*args, **kwargs)

        return run_async

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        with request_scope():
            return test(*args, **kwargs)

    return run


# hookwrapper, not wrapper=True: pytest loads this plugin wherever the package is installed, and
# pluggy before 1.2 (pytest 7's range) rejects wrapper=True, which would abort the whole session.
@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, None]:
    """Run the body of a test that asked for ``di_scope`` inside a request scope.

    The scope wraps the call itself, not a fixture: then the test's own exception
    reaches the finalizers (a failing test rolls back, as a failing request does),
    and an async test's scope lives on the event loop its async plugin runs it on
    (this hook runs before anyio's, which calls the wrapper).
    """
    if _SCOPE_FIXTURE not in pyfuncitem.fixturenames:
        yield
        return
    hypothesis = getattr(pyfuncitem.obj, "hypothesis", None)
    if hypothesis is not None:  # one scope per generated example, not one for them all
        inner = hypothesis.inner_test
        hypothesis.inner_test = _in_scope(inner)
        try:
            yield
        finally:
            hypothesis.inner_test = inner
        return
    original = pyfuncitem.obj
    pyfuncitem.obj = _in_scope(original)
    try:
        yield
    finally:
        pyfuncitem.obj = original


@pytest.fixture
def di_scope() -> None:
    """Run the test function inside a ``request_scope()``; ``current_scope()`` returns it.

    RequestScoped providers resolve in the test as in a request: one instance for
    the whole test, torn down after it with its outcome (a unit of work commits
    when the test passes and rolls back when it fails). Other fixtures run before
    the scope opens: give them ``with request_scope():`` of their own. Async tests
    need anyio's pytest plugin (``@pytest.mark.anyio``).

    .. versionadded:: 0.2.0
    """


@pytest.fixture
def di_override() -> Iterator[Overrides]:
    """``di_override(provider, replacement)``: override providers until the test ends, even if it fails.

    ``replacement`` may be a provider or any object. ``di_override.providers(container, name=...)``
    overrides by name. Async modes are restored afterwards (see :func:`~di_request_scope.testing.override`).

    .. versionadded:: 0.2.0
    """
    from .testing import Overrides

    overrides = Overrides()
    try:
        yield overrides
    finally:
        overrides.reset()


@pytest.fixture
def di_engine() -> object:
    """The engine of the test database; define a fixture of this name to use the transaction fixtures.

    .. versionadded:: 0.2.0
    """
    pytest.fail(
        "di_transaction and di_async_transaction need the engine of your test database: define a "
        "fixture named `di_engine` (in conftest.py, any scope) that returns or yields a SQLAlchemy "
        "Engine, or an AsyncEngine for di_async_transaction, on a database whose tables exist",
        pytrace=False,
    )


@pytest.fixture
def di_transaction(di_engine: Any) -> Iterator[RolledBackTransaction]:
    """A transaction on ``di_engine`` that is rolled back after the test; nothing the app commits persists.

    ``di_transaction.bind(container.session_factory)`` makes the app's sessions join
    it (their commits release SAVEPOINTs); ``di_transaction.connection`` reads what
    they wrote. One connection: requests must not overlap.

    .. versionadded:: 0.2.0
    """
    from .testing import RolledBackTransaction

    try:
        transaction = RolledBackTransaction(di_engine)
        transaction.__enter__()
    except TypeError as exc:
        pytest.fail(f"di_transaction: {exc}", pytrace=False)
    try:
        yield transaction
    finally:
        transaction.__exit__(None, None, None)


@pytest.fixture
async def di_async_transaction(di_engine: Any) -> AsyncIterator[AsyncRolledBackTransaction]:
    """:func:`di_transaction` for an ``AsyncEngine``, in async tests (``@pytest.mark.anyio``).

    Drive the app from the test with ``httpx.AsyncClient(transport=httpx.ASGITransport(app))``:
    the connection belongs to the test's event loop.

    .. versionadded:: 0.2.0
    """
    from .testing import AsyncRolledBackTransaction

    try:
        transaction = AsyncRolledBackTransaction(di_engine)
        await transaction.__aenter__()
    except TypeError as exc:
        pytest.fail(f"di_async_transaction: {exc}", pytrace=False)
    try:
        yield transaction
    finally:
        await transaction.__aexit__(None, None, None)
