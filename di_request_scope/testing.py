"""Test helpers: overrides that undo themselves, and a database transaction rolled back after each test.

The pytest plugin (``di_request_scope.pytest_plugin``) turns these into fixtures;
they work without pytest too. SQLAlchemy is imported only when a transaction is
opened, so the plugin costs nothing in projects that never use one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from dependency_injector import providers

from ._provider import RequestScoped

if TYPE_CHECKING:
    from dependency_injector import containers
    from sqlalchemy.engine import Connection, Engine, RootTransaction
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
    from sqlalchemy.ext.asyncio.engine import AsyncTransaction
    from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "AsyncRolledBackTransaction",
    "Overrides",
    "RolledBackTransaction",
    "override",
    "override_providers",
]

P = TypeVar("P", bound="providers.Provider[Any]")

_ENABLED, _DISABLED, _UNDEFINED = "enabled", "disabled", "undefined"


def _async_mode(provider: providers.Provider[Any]) -> str:
    if provider.is_async_mode_enabled():
        return _ENABLED
    if provider.is_async_mode_disabled():
        return _DISABLED
    return _UNDEFINED


def _restore_async_mode(provider: providers.Provider[Any], mode: str) -> None:
    if mode == _ENABLED:
        provider.enable_async_mode()
    elif mode == _DISABLED:
        provider.disable_async_mode()
    else:
        provider.reset_async_mode()


def _as_provider(replacement: object) -> providers.Provider[Any]:
    if isinstance(replacement, providers.Provider):
        return replacement
    return providers.Object(replacement)


def _remove(provider: providers.Provider[Any], overriding: providers.Provider[Any]) -> None:
    # Pop down to ours: an override stacked on it and never reset must not outlive it either.
    while any(p is overriding for p in provider.overridden):
        provider.reset_last_overriding()


@contextmanager
def override(provider: P, replacement: object) -> Iterator[providers.Provider[Any]]:
    """Override ``provider`` for a block; undone when the block exits, also by an exception.

    Unlike ``provider.override()``, this also restores the provider's async mode.
    dependency-injector fixes that mode at a provider's first call, so a sync
    stand-in for a provider that depends on an ``AsyncSession`` would otherwise
    leave it returning un-awaited values once the override is gone. Overrides
    stacked on this one during the block are removed with it.

    Args:
        provider: The provider to replace, a ``RequestScoped`` one included.
        replacement: A provider, or any object (then every resolution returns it).

    Yields:
        The overriding provider.

    .. versionadded:: 0.2.0
    """
    overriding = _as_provider(replacement)
    mode = _async_mode(provider)
    provider.override(overriding)
    try:
        yield overriding
    finally:
        _remove(provider, overriding)
        _restore_async_mode(provider, mode)


@contextmanager
def override_providers(container: containers.Container, **replacements: object) -> Iterator[None]:
    """Override providers of ``container`` by name for a block, as :func:`override` does.

    The async modes of *every* provider of the container are restored at the end,
    so services built from sync stand-ins do not stay pinned to sync mode either.

    Raises:
        AttributeError: the container has no provider of that name.

    .. versionadded:: 0.2.0
    """
    known = container.providers
    for name in replacements:
        if name not in known:
            declared = getattr(container, "declarative_parent", None) or type(container)
            raise AttributeError(
                f"{declared.__name__} has no provider {name!r}; its providers are {', '.join(sorted(known))}"
            )
    every: list[providers.Provider[Any]] = list(container.traverse())
    modes = [(p, _async_mode(p)) for p in every]
    try:
        with ExitStack() as stack:
            for name, replacement in replacements.items():
                stack.enter_context(override(known[name], replacement))
            yield
    finally:
        for provider, mode in modes:
            _restore_async_mode(provider, mode)


class Overrides:
    """Overrides that last until :meth:`reset`: the ``di_override`` fixture resets them after the test.

    .. versionadded:: 0.2.0
    """

    def __init__(self) -> None:
        self._stack = ExitStack()

    def __call__(self, provider: providers.Provider[Any], replacement: object) -> providers.Provider[Any]:
        """Override ``provider`` with ``replacement`` (a provider or any object); return the override."""
        return self._stack.enter_context(override(provider, replacement))

    def providers(self, container: containers.Container, **replacements: object) -> None:
        """Override providers of ``container`` by name, as :func:`override_providers` does."""
        self._stack.enter_context(override_providers(container, **replacements))

    def reset(self) -> None:
        """Undo every override, the last one first."""
        self._stack.close()


# --- transactions -----------------------------------------------------------------------------

_JOIN_MODE = "create_savepoint"


def _begin_sqlite(connection: Connection) -> None:
    """Make the outer transaction real on SQLite.

    pysqlite and aiosqlite defer BEGIN until the first write, so the first
    SAVEPOINT of the app's session would start the real transaction, and its
    RELEASE (the app's commit) would end it: the test's writes would be committed.
    SQLAlchemy documents the same problem for savepoints ("Serializable isolation /
    Savepoints / Transactional DDL"); an engine that applies its recipe has begun
    already, and then nothing is done here.
    """
    if connection.dialect.name != "sqlite":
        return
    dbapi = connection.connection.dbapi_connection
    begun = getattr(dbapi, "in_transaction", None)
    if begun is None:  # aiosqlite's adapter keeps the aiosqlite connection here
        begun = getattr(getattr(dbapi, "_connection", None), "in_transaction", None)
    if begun is None:
        raise RuntimeError(
            f"cannot tell whether the SQLite driver {connection.dialect.driver!r} has begun a transaction, "
            "so the test's writes could be committed; use pysqlite or aiosqlite, or apply SQLAlchemy's "
            "recipe (an engine 'begin' event that emits BEGIN) to the engine"
        )
    if not begun:
        connection.exec_driver_sql("BEGIN")


def _options_of(source: object) -> dict[str, Any] | None:
    """The app's session options (``expire_on_commit``, ``class_``...) but ``bind``; None if unknown."""
    from sqlalchemy.ext.asyncio import async_sessionmaker
    from sqlalchemy.orm import sessionmaker

    if isinstance(source, (sessionmaker, async_sessionmaker)):
        options = {k: v for k, v in source.kw.items() if k != "bind"}
        options["class_"] = source.class_
        return options
    provides = getattr(source, "provides", None)
    if isinstance(source, providers.Provider) and inspect.isclass(provides):
        if not issubclass(provides, (sessionmaker, async_sessionmaker)):
            return None
        kwargs: dict[str, Any] = getattr(source, "kwargs", {})
        return {k: v() if isinstance(v, providers.Provider) else v for k, v in kwargs.items() if k != "bind"}
    if isinstance(source, providers.Object):
        return _options_of(source())
    return None


def _makes_async_sessions(source: object) -> bool | None:
    from sqlalchemy.ext.asyncio import async_sessionmaker
    from sqlalchemy.orm import sessionmaker

    target = source() if isinstance(source, providers.Object) else getattr(source, "provides", source)
    for kind, is_async in ((async_sessionmaker, True), (sessionmaker, False)):
        if isinstance(target, kind) or (inspect.isclass(target) and issubclass(target, kind)):
            return is_async
    return None


class _Binding:
    """What ``bind()`` shares between the sync and the async transaction."""

    _is_async = False

    def __init__(self, **session_options: Any) -> None:
        if session_options.get("join_transaction_mode", _JOIN_MODE) != _JOIN_MODE:
            raise ValueError(
                "the test transaction needs join_transaction_mode='create_savepoint': with any other mode "
                "the app's commit would end it, and its writes would outlive the test"
            )
        self._session_options = session_options
        self._overrides = ExitStack()
        self._open = False

    def _factory(self, options: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _replacement(self, provider: providers.Provider[Any], options: dict[str, Any]) -> Any:
        if isinstance(provider, RequestScoped):
            from .sqlalchemy import unit_of_work

            replacement: RequestScoped[Any] | None = None
            if provider.provides is unit_of_work:
                source = provider.args[0] if provider.args else None
                self._check_kind(provider, source)
                found = _options_of(source) if source is not None else None
                factory = self._factory({**(found or {}), **options})
                # The app's other arguments (offload=...) stay as they were.
                replacement = RequestScoped(unit_of_work, factory, *provider.args[1:], **provider.kwargs)
            elif _makes_async_sessions(provider.provides) is not None:
                self._check_kind(provider, provider.provides)
                found = _options_of(provider.provides)
                replacement = RequestScoped(self._factory({**(found or {}), **options}))
            if replacement is not None:
                replacement._name = f"{provider} (on the test transaction)"  # errors name the app's provider
                return replacement
            raise TypeError(
                f"cannot tell how {provider} makes its session: bind the provider of its sessionmaker "
                "instead (container.session_factory), or a RequestScoped(unit_of_work, ...)"
            )
        self._check_kind(provider, provider)
        if _makes_async_sessions(provider) is None:  # an engine's provider, say: refuse, never guess
            provides = getattr(provider, "provides", provider)
            what = getattr(provides, "__qualname__", repr(provides))
            raise TypeError(
                f"{provider} provides {what}, not a sessionmaker: bind the provider of the app's "
                "sessionmaker (container.session_factory, a Singleton(sessionmaker, ...)) or its "
                "RequestScoped session"
            )
        found = _options_of(provider)
        return providers.Object(self._factory({**(found or {}), **options}))

    def _check_kind(self, provider: providers.Provider[Any], source: object) -> None:
        is_async = _makes_async_sessions(source)
        if is_async is None or is_async == self._is_async:
            return
        if is_async:
            raise TypeError(
                f"{provider} makes AsyncSession objects: bind it to an AsyncRolledBackTransaction on an "
                "AsyncEngine (the di_async_transaction fixture, in an async test)"
            )
        raise TypeError(
            f"{provider} makes sync Session objects: bind it to a RolledBackTransaction on an Engine "
            "(the di_transaction fixture)"
        )

    def bind(self, *targets: providers.Provider[Any], **session_options: Any) -> None:
        """Point the app's session providers at this transaction until it ends.

        Each target is overridden so that the app's sessions join the test's
        transaction: a provider of a sessionmaker (``container.session_factory``)
        gets one bound to the test connection, a ``RequestScoped(unit_of_work, ...)``
        or ``RequestScoped(SessionLocal)`` gets the same initializer on it. The
        app's session options (``expire_on_commit``, ``class_``...) are kept when
        they can be read from the provider; ``session_options`` add to them.

        Raises:
            TypeError: a target that makes no sessions, or the other kind (sync/async).
        """
        if not self._open:
            raise RuntimeError("bind() needs an open transaction: call it inside `with` / `async with`")
        for provider in targets:
            options = {**self._session_options, **session_options, "join_transaction_mode": _JOIN_MODE}
            self._overrides.enter_context(override(provider, self._replacement(provider, options)))


class RolledBackTransaction(_Binding):
    """A connection whose transaction is rolled back at the end, whatever the code under test committed.

    Sessions from :attr:`session_factory`, and the app's sessions once their
    providers are :meth:`bind`-ed, join it with
    ``join_transaction_mode="create_savepoint"``: their ``commit()`` releases a
    SAVEPOINT and their ``rollback()`` rolls back to one, so the app's unit of work
    behaves as in production while nothing outlives the transaction. Everything
    runs on one connection: requests must not overlap. On SQLite the outer
    transaction is begun explicitly, since pysqlite would let the first SAVEPOINT
    begin it and the app's first commit end it.

    ``with RolledBackTransaction(engine) as tx: tx.bind(container.session_factory)``

    Args:
        engine: The test database's engine; its tables must exist.
        session_options: sessionmaker options for every session of the transaction.

    .. versionadded:: 0.2.0
    """

    def __init__(self, engine: Engine, **session_options: Any) -> None:
        super().__init__(**session_options)
        self.engine = engine
        self._connection: Connection | None = None
        self._transaction: RootTransaction | None = None
        self._session_factory: sessionmaker[Session] | None = None

    @property
    def connection(self) -> Connection:
        """The test's connection: it sees what the app wrote and committed in this transaction."""
        if self._connection is None:
            raise RuntimeError("the transaction is not open: use it inside `with`")
        return self._connection

    @property
    def session_factory(self) -> sessionmaker[Session]:
        """A sessionmaker whose sessions join the transaction (commit = release a SAVEPOINT)."""
        if self._session_factory is None:
            raise RuntimeError("the transaction is not open: use it inside `with`")
        return self._session_factory

    def _factory(self, options: dict[str, Any]) -> sessionmaker[Session]:
        from sqlalchemy.orm import sessionmaker

        return sessionmaker(bind=self.connection, **options)

    def __enter__(self) -> RolledBackTransaction:
        from sqlalchemy.engine import Engine

        engine: object = self.engine  # a fixture may hand over anything
        if not isinstance(engine, Engine):
            hint = (
                "; this is an AsyncEngine: use AsyncRolledBackTransaction (di_async_transaction)"
                if hasattr(engine, "sync_engine")
                else ""
            )
            raise TypeError(f"RolledBackTransaction needs a SQLAlchemy Engine, got {engine!r}{hint}")
        if self._connection is not None:
            raise RuntimeError("this transaction is already open; create one per test")
        connection = self.engine.connect()
        try:
            self._transaction = connection.begin()
            _begin_sqlite(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        self._open = True
        self._session_factory = self._factory({**self._session_options, "join_transaction_mode": _JOIN_MODE})
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection, transaction = self._connection, self._transaction
        self._connection = self._transaction = self._session_factory = None
        self._open = False
        try:
            self._overrides.close()
        finally:
            if connection is not None:
                try:
                    if transaction is not None and transaction.is_active:
                        transaction.rollback()
                finally:
                    connection.close()


class AsyncRolledBackTransaction(_Binding):
    """:class:`RolledBackTransaction` for an ``AsyncEngine`` and ``AsyncSession``: ``async with``.

    The connection belongs to the event loop that opened it, so the app must run
    on that loop too: drive it with ``httpx.AsyncClient(transport=httpx.ASGITransport(app))``
    from the async test, not with Starlette's ``TestClient``, which runs the app
    on a loop of its own.

    .. versionadded:: 0.2.0
    """

    _is_async = True

    def __init__(self, engine: AsyncEngine, **session_options: Any) -> None:
        super().__init__(**session_options)
        self.engine = engine
        self._connection: AsyncConnection | None = None
        self._transaction: AsyncTransaction | None = None
        self._session_factory: async_sessionmaker[AsyncSession] | None = None

    @property
    def connection(self) -> AsyncConnection:
        """The test's connection: it sees what the app wrote and committed in this transaction."""
        if self._connection is None:
            raise RuntimeError("the transaction is not open: use it inside `async with`")
        return self._connection

    @property
    def session_factory(self) -> async_sessionmaker[AsyncSession]:
        """An async_sessionmaker whose sessions join the transaction."""
        if self._session_factory is None:
            raise RuntimeError("the transaction is not open: use it inside `async with`")
        return self._session_factory

    def _factory(self, options: dict[str, Any]) -> async_sessionmaker[AsyncSession]:
        from sqlalchemy.ext.asyncio import async_sessionmaker

        return async_sessionmaker(bind=self.connection, **options)

    async def __aenter__(self) -> AsyncRolledBackTransaction:
        from sqlalchemy.ext.asyncio import AsyncEngine

        engine: object = self.engine  # a fixture may hand over anything
        if not isinstance(engine, AsyncEngine):
            raise TypeError(
                f"AsyncRolledBackTransaction needs a SQLAlchemy AsyncEngine, got {engine!r}; "
                "for an Engine use RolledBackTransaction (di_transaction)"
            )
        if self._connection is not None:
            raise RuntimeError("this transaction is already open; create one per test")
        connection = await self.engine.connect()
        try:
            self._transaction = await connection.begin()
            await connection.run_sync(_begin_sqlite)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._open = True
        self._session_factory = self._factory({**self._session_options, "join_transaction_mode": _JOIN_MODE})
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection, transaction = self._connection, self._transaction
        self._connection = self._transaction = self._session_factory = None
        self._open = False
        try:
            self._overrides.close()
        finally:
            if connection is not None:
                try:
                    if transaction is not None and transaction.is_active:
                        await transaction.rollback()
                finally:
                    await connection.close()
