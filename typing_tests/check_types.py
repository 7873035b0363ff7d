"""Static checks that ``RequestScoped[T]`` keeps ``T``; type-checked with ``mypy --strict``, never run.

``assert_type`` fails when the inferred type is anything else, ``Any`` included. The
``# type: ignore[assignment]`` lines are negative checks: under ``--strict``
(``warn_unused_ignores``) they fail as soon as the provided type degrades to ``Any``,
because the ignore is then no longer needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from dependency_injector import containers, providers
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import assert_type

from di_request_scope import RequestScope, RequestScoped, current_scope, request_scope


class Repository:
    def __init__(self, session: Session) -> None:
        self.session = session


def session_generator(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session


async def async_session_generator(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with AsyncSession(engine) as session:
        yield session


async def make_repository(session: Session) -> Repository:
    return Repository(session)


class Container(containers.DeclarativeContainer):
    engine = providers.Singleton(create_engine, "sqlite://")
    async_engine = providers.Singleton(create_async_engine, "sqlite+aiosqlite://")
    # The documented pattern. SQLAlchemy itself types this Singleton as
    # Singleton[sessionmaker[Any]], so the best RequestScoped can infer is Session-compatible.
    session_factory = providers.Singleton(sessionmaker, bind=engine)
    # The same with the session class spelled out: T must be exactly Session.
    typed_session_factory = providers.Singleton(sessionmaker[Session], bind=engine)

    # a class
    plain_session = RequestScoped(Session, bind=engine)
    # a generator function
    generated_session = RequestScoped(session_generator, engine)
    # an async generator function
    async_session = RequestScoped(async_session_generator, async_engine)
    # an async function
    repository = RequestScoped(make_repository, plain_session)
    # a provider whose result is called
    db = RequestScoped(session_factory)
    typed_db = RequestScoped(typed_session_factory)


def provider_types() -> None:
    assert_type(Container.plain_session, RequestScoped[Session])
    assert_type(Container.generated_session, RequestScoped[Session])
    assert_type(Container.async_session, RequestScoped[AsyncSession])
    assert_type(Container.repository, RequestScoped[Repository])
    assert_type(Container.typed_db, RequestScoped[Session])


def sync_uses(container: Container) -> None:
    with request_scope() as scope:
        assert_type(scope, RequestScope)
        assert_type(current_scope(), RequestScope)

        s1: Session = container.plain_session()
        s2: Session = container.generated_session()
        s3: Session = container.db()
        s4: Session = container.typed_db()
        assert_type(container.plain_session(), Session)
        assert_type(container.generated_session(), Session)
        assert_type(container.typed_db(), Session)

        wrong1: int = container.plain_session()  # type: ignore[assignment]
        wrong2: int = container.generated_session()  # type: ignore[assignment]
        wrong3: int = container.typed_db()  # type: ignore[assignment]
        del s1, s2, s3, s4, wrong1, wrong2, wrong3


async def async_uses(container: Container) -> None:
    async with request_scope():
        a1: AsyncSession = await container.async_session.async_()
        r1: Repository = await container.repository.async_()
        assert_type(await container.async_session.async_(), AsyncSession)
        assert_type(await container.repository.async_(), Repository)

        wrong1: int = await container.async_session.async_()  # type: ignore[assignment]
        wrong2: int = await container.repository.async_()  # type: ignore[assignment]
        del a1, r1, wrong1, wrong2


@request_scope()
def decorated_job(n: int) -> str:
    return str(n)


@request_scope()
async def decorated_async_job(n: int) -> str:
    return str(n)


async def decorated_uses() -> None:
    assert_type(decorated_job(1), str)
    assert_type(await decorated_async_job(1), str)


def unit_of_work_types(engine: Engine) -> None:
    from di_request_scope.sqlalchemy import unit_of_work

    factory: sessionmaker[Session] = sessionmaker(bind=engine)
    uow = RequestScoped(unit_of_work, factory)
    session: Session = uow()
    assert session is not None


def middleware_fits_every_framework() -> None:
    """The middleware type-checks where each framework takes an ASGI middleware."""
    from fastapi import FastAPI
    from litestar import Litestar, get
    from litestar.middleware import DefineMiddleware
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    from di_request_scope import RequestScopeMiddleware

    @get("/")
    async def index() -> str:
        return "ok"

    Litestar(
        [index],
        middleware=[
            RequestScopeMiddleware,
            DefineMiddleware(RequestScopeMiddleware, is_failure_status=lambda status: status >= 500),
        ],
    )
    RequestScopeMiddleware(Litestar([index]))
    Starlette(middleware=[Middleware(RequestScopeMiddleware, websocket_scope="message")])
    FastAPI().add_middleware(RequestScopeMiddleware)
