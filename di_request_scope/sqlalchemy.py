"""SQLAlchemy unit of work per request: commit before the response, roll back on failure, always close.

Declare one session per request in a container::

    db = RequestScoped(unit_of_work, SessionLocal)          # sync Session
    db = RequestScoped(unit_of_work, async_session_factory) # AsyncSession

The data-safety rule: under :class:`~di_request_scope.RequestScopeMiddleware` the
transaction is committed *before* a successful status is sent, so a failed commit
becomes a 5xx, never a 2xx. Writes made after that (a streaming body, a background
task) are committed at teardown; since the client already has its status, a
failure there is raised as :class:`LateCommitError` and logged, never lost silently.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, overload

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

try:  # SQLAlchemy's asyncio support needs greenlet (the sqlalchemy[asyncio] extra)
    from sqlalchemy.ext.asyncio import AsyncSession as _AsyncSession
    from sqlalchemy.ext.asyncio import create_async_engine
except ImportError:  # pragma: no cover - the test extra installs it
    _AsyncSession = None  # type: ignore[assignment,misc]

from ._scope import RequestScope, _shielded, _to_thread, current_scope
from .exceptions import RequestScopeError

__all__ = [
    "LateCommitError",
    "RollbackOnlyError",
    "managed_async_engine",
    "managed_engine",
    "transactional",
    "unit_of_work",
]

F = TypeVar("F", bound=Callable[..., Any])
AnySession: TypeAlias = "Session | AsyncSession"

# Session.info keys: the rollback-only mark of a failed transactional() method that
# joined a transaction, and the mark of a session owned by a unit of work, whose
# transaction spans the whole request even before its first statement.
_ROLLBACK_ONLY = "di_request_scope.rollback_only"
_UNIT_OF_WORK = "di_request_scope.unit_of_work"
# The thread in which a unit of work's current transaction began (took its connection).
_BEGAN_IN = "di_request_scope.began_in"
# Set on each session class (a sessionmaker's own subclass) whose begins are listened for.
_LISTENING = "_di_request_scope_listening"
_listen_lock = threading.Lock()


def _note_begin_thread(session: Session, transaction: Any, connection: Any) -> None:
    info = session.info
    if _UNIT_OF_WORK in info:
        info[_BEGAN_IN] = threading.get_ident()


def _listen_for_begins(cls: type[Session]) -> None:
    """Learn where each unit of work does its I/O: one listener per session class, on first use.

    The class is the sessionmaker's own subclass, so sessions made elsewhere (another
    sessionmaker, a script's ``Session(engine)``) pay nothing for the event.
    """
    with _listen_lock:
        if not getattr(cls, _LISTENING, False):
            event.listen(cls, "after_begin", _note_begin_thread)
            setattr(cls, _LISTENING, True)


class LateCommitError(RequestScopeError):
    """A commit made after the response status was sent failed; those writes were not saved.

    Writes made in a streaming body or a background task run after the client
    received its status, so the only place left to report the failure is the log.
    Do such writes in the endpoint, or give the background work its own scope with
    ``request_scope()`` so it can handle the error.
    """


class RollbackOnlyError(RequestScopeError):
    """A ``transactional`` method failed inside a transaction it joined, and the caller went on.

    Its partial writes share the request's transaction, so committing would save
    half of a failed operation; the whole transaction is rolled back instead. Use
    ``@transactional(savepoint=True)`` for an operation whose failure the caller
    wants to recover from.
    """


def _rollback_only_error(session: AnySession) -> RollbackOnlyError:
    """The error for a session that carries the rollback-only mark (check for it first)."""
    name, exc = session.info[_ROLLBACK_ONLY]
    return RollbackOnlyError(
        f"transactional method {name} failed with {type(exc).__name__}: {exc}, inside a transaction it "
        "joined, and the request went on; the whole transaction was rolled back so that no half-done "
        "operation is committed. Let the exception propagate, or use @transactional(savepoint=True) "
        "to recover from it."
    )


@overload
def unit_of_work(
    session_factory: Callable[[], Session], *, offload: bool | None = None
) -> AbstractContextManager[Session]: ...
@overload
def unit_of_work(
    session_factory: Callable[[], AsyncSession], *, offload: bool | None = None
) -> AsyncIterator[AsyncSession]: ...
def unit_of_work(
    session_factory: Callable[[], AnySession], *, offload: bool | None = None
) -> AbstractContextManager[Session] | AsyncIterator[AsyncSession]:
    """Initializer for ``RequestScoped``: one session per scope, committed by the outcome.

    ``RequestScoped(unit_of_work, SessionLocal)`` gives each request one
    ``Session`` (or ``AsyncSession``, from an ``async_sessionmaker``): committed
    before a successful response starts, rolled back when the request fails (an
    exception, a status >= 400, a client that left early), always closed.
    ``session_factory`` may be a provider of the sessionmaker, so the engine can
    live in the container and be created in the app's lifespan.

    In a job under ``request_scope()`` the commit happens when the block exits
    without an exception.

    Args:
        session_factory: A ``sessionmaker`` or ``async_sessionmaker``, or a provider of one.
        offload: Where a sync session's commit and rollback run under the
            middleware. ``None`` (the default): in a worker thread when the
            transaction began in one (a ``def`` endpoint or dependency ran its
            queries), on the event loop when async code already ran them there.
            ``True``: always in a worker thread. ``False``: always on the event
            loop, saving the thread hop where a commit cannot block for long (an
            in-memory SQLite database in tests). Ignored for ``AsyncSession``.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2.0 ``offload``; commits no longer always take a worker thread.
    """
    scope = current_scope()
    session = session_factory()
    is_async = _AsyncSession is not None and isinstance(session, _AsyncSession)
    if not is_async and not isinstance(session, Session):
        raise TypeError(
            f"unit_of_work needs a factory of Session or AsyncSession (a sessionmaker), got "
            f"{type(session).__name__} from {session_factory!r}"
        )
    session.info[_UNIT_OF_WORK] = True
    if is_async:
        return _async_unit_of_work(session, scope)  # type: ignore[arg-type]
    cls = type(session)
    if not getattr(cls, _LISTENING, False):
        _listen_for_begins(cls)  # type: ignore[arg-type]
    return _SyncUnitOfWork(session, scope, offload)  # type: ignore[arg-type]


class _SyncUnitOfWork:
    """The sync unit of work as a context manager, so teardown can tell when it needs no thread.

    Unless ``offload`` pins them, commit and rollback run where the session's
    transaction began: in a worker thread when a sync endpoint or dependency did
    the queries there, on the event loop when async code already ran them on the
    loop (it blocked the loop for every query; a thread hop for the commit would
    only add latency). A session holding no transaction does no I/O and is closed
    on the loop.
    """

    __slots__ = ("offload", "scope", "session")

    def __init__(self, session: Session, scope: RequestScope, offload: bool | None = None) -> None:
        self.session = session
        self.scope = scope
        self.offload = offload
        # Refused once the status is out (created in a streaming body, a background
        # task): then it commits at teardown only.
        scope._add_before_response(self)

    def __call__(self) -> Awaitable[None] | None:
        """The commit before the response: a failure here still becomes a 5xx.

        Run where the transaction began: the awaitable of a worker thread's commit, or
        None when it committed right here.
        """
        session = self.session
        if not _has_work(session):
            return None
        if self._offloads():
            return _to_thread(functools.partial(_commit, session))
        _commit(session)
        return None

    def __enter__(self) -> Session:
        return self.session

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._di_request_scope_exit(exc)

    def _di_request_scope_exit(self, exc: BaseException | None) -> None:
        """The teardown step, called by the scope with its failure (saves unpacking it for ``__exit__``)."""
        session = self.session
        try:
            if exc is not None:
                session.rollback()
            elif _has_work(session):
                _commit(session, late=self.scope.response_started)
        finally:
            session.info.pop(_ROLLBACK_ONLY, None)
            session.close()

    def _di_request_scope_blocks(self, failure: BaseException | None = None) -> bool:
        # Only a transaction to commit or roll back talks to the database.
        return _has_work(self.session) and self._offloads()

    def _offloads(self) -> bool:
        """Whether commit and rollback go to a worker thread: where the transaction began, unless pinned."""
        if self.scope._sync_only:  # torn down where no event loop runs (WSGI): nothing to spare
            return False
        if self.offload is not None:
            return self.offload
        return self.session.info.get(_BEGAN_IN) != threading.get_ident()


def _has_work(session: AnySession) -> bool:
    """A transaction to commit or roll back, or a rollback-only mark to report."""
    return session.in_transaction() or _ROLLBACK_ONLY in session.info


def _commit(session: Session, *, late: bool = False) -> None:
    if _ROLLBACK_ONLY in session.info:
        error = _rollback_only_error(session)  # before the rollback, whatever its listeners do to info
        session.rollback()
        raise error
    try:
        session.commit()
    except Exception as exc:
        session.rollback()
        if late:
            raise LateCommitError(_late_message(exc)) from exc
        raise


async def _async_unit_of_work(session: AsyncSession, scope: RequestScope) -> AsyncIterator[AsyncSession]:
    async def commit_before_response() -> None:
        if _has_work(session):
            # Shielded: a commit cut off half-way by a timeout would leave its outcome unknown.
            await _shielded(functools.partial(_acommit, session))

    scope._add_before_response(commit_before_response)  # refused after the status: teardown commits
    try:
        yield session
    except BaseException:
        await session.rollback()
        raise
    else:
        if _has_work(session):
            await _acommit(session, late=scope.response_started)
    finally:
        session.info.pop(_ROLLBACK_ONLY, None)
        await session.close()


async def _acommit(session: AsyncSession, *, late: bool = False) -> None:
    if _ROLLBACK_ONLY in session.info:
        error = _rollback_only_error(session)  # before the rollback, whatever its listeners do to info
        await session.rollback()
        raise error
    try:
        await session.commit()
    except Exception as exc:
        await session.rollback()
        if late:
            raise LateCommitError(_late_message(exc)) from exc
        raise


def _late_message(exc: BaseException) -> str:
    return (
        f"commit after the response status was sent failed with {type(exc).__name__}: {exc}. Writes made "
        "in a streaming body, a background task or after a WebSocket message's first reply were NOT "
        "saved, and the client was already told the request succeeded. Make such writes before the "
        "response (or reply), or give the background work its own request_scope()."
    )


SessionSource = str | Callable[[], Any]


@overload
def transactional(func: F, /) -> F: ...
@overload
def transactional(*, session: SessionSource = "session", savepoint: bool = False) -> Callable[[F], F]: ...
def transactional(
    func: F | None = None, /, *, session: SessionSource = "session", savepoint: bool = False
) -> F | Callable[[F], F]:
    """Run a sync or async service method inside its session's transaction.

    Begins a transaction and commits or rolls it back when none is open; joins
    the open one otherwise (the request's unit of work), so transactions never
    nest by accident. If a method fails inside a joined transaction and the caller
    swallows the error, the transaction becomes rollback-only: the unit of work
    rolls back and raises :class:`RollbackOnlyError` instead of committing half an
    operation. ``savepoint=True`` wraps the call in ``SAVEPOINT`` instead, so its
    failure undoes only its own writes.

    Args:
        session: Where the session comes from: the name of an attribute of the
            method's first argument (``"session"``, the default: services get
            their session injected), or a callable such as the ``RequestScoped``
            provider itself (``container.db``).
        savepoint: Use a nested transaction (``SAVEPOINT``).

    .. versionadded:: 0.1
    """

    def decorate(fn: F) -> F:
        name = getattr(fn, "__qualname__", repr(fn))

        def get_session(args: tuple[Any, ...]) -> Any:
            if callable(session):
                return session()
            if not args or not hasattr(args[0], session):
                found = f"{type(args[0]).__name__} has no such attribute" if args else "it got no arguments"
                raise TypeError(
                    f"@transactional on {name} looks for the session in `self.{session}`, but {found}; "
                    "inject the session into that attribute, or pass session=<provider or callable>"
                )
            return getattr(args[0], session)

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                sess = get_session(args)
                if inspect.isawaitable(sess):
                    sess = await sess
                joins = sess.in_transaction() or sess.info.get(_UNIT_OF_WORK)
                if savepoint and joins:
                    marked = _ROLLBACK_ONLY in sess.info
                    try:
                        async with sess.begin_nested():
                            return await fn(*args, **kwargs)
                    except BaseException:
                        _forget_inner_failures(sess, marked)
                        raise
                if joins:
                    try:
                        return await fn(*args, **kwargs)
                    except BaseException as exc:
                        sess.info.setdefault(_ROLLBACK_ONLY, (name, exc))
                        raise
                async with sess.begin():
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sess = get_session(args)
            joins = sess.in_transaction() or sess.info.get(_UNIT_OF_WORK)
            if savepoint and joins:
                marked = _ROLLBACK_ONLY in sess.info
                try:
                    with sess.begin_nested():
                        return fn(*args, **kwargs)
                except BaseException:
                    _forget_inner_failures(sess, marked)
                    raise
            if joins:
                try:
                    return fn(*args, **kwargs)
                except BaseException as exc:
                    sess.info.setdefault(_ROLLBACK_ONLY, (name, exc))
                    raise
            with sess.begin():
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    if func is not None:
        return decorate(func)
    return decorate


def _forget_inner_failures(session: Any, was_marked: bool) -> None:
    # The savepoint's rollback undid whatever failed inside it, so a rollback-only
    # mark set in there no longer describes the outer transaction.
    if not was_marked:
        session.info.pop(_ROLLBACK_ONLY, None)


def managed_engine(url: str, **kwargs: Any) -> Iterator[Engine]:
    """Resource initializer: ``engine = providers.Resource(managed_engine, url)``; disposed on shutdown.

    .. versionadded:: 0.1
    """
    engine = create_engine(url, **kwargs)
    try:
        yield engine
    finally:
        engine.dispose()


async def managed_async_engine(url: str, **kwargs: Any) -> AsyncIterator[AsyncEngine]:
    """Async twin of :func:`managed_engine` for ``create_async_engine``.

    .. versionadded:: 0.1
    """
    if _AsyncSession is None:  # pragma: no cover - the test extra installs greenlet
        raise ImportError("async engines need SQLAlchemy's asyncio extra: pip install 'sqlalchemy[asyncio]'")
    engine = create_async_engine(url, **kwargs)
    try:
        yield engine
    finally:
        await engine.dispose()
