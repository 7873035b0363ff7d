"""The container: an AsyncEngine created in the app's lifespan, one AsyncSession per request."""

from __future__ import annotations

from collections.abc import AsyncIterator

from dependency_injector import containers, providers
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from di_request_scope import RequestScoped
from di_request_scope.sqlalchemy import managed_async_engine, unit_of_work

from ..notes_app.models import Base
from .repositories import NoteRepository, UserRepository
from .services import NotesService


async def create_schema(engine: AsyncEngine) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield


class Container(containers.DeclarativeContainer):
    wiring_config = containers.WiringConfiguration(modules=[".routes"])

    config = providers.Configuration()
    engine = providers.Resource(managed_async_engine, config.database_url)
    schema = providers.Resource(create_schema, engine)
    session_factory = providers.Singleton(async_sessionmaker, bind=engine)

    # One AsyncSession per request: committed before a 2xx is sent, rolled back on failure.
    # It is created asynchronously, so `session`, and every Factory that depends on it,
    # returns an awaitable; @inject awaits it before calling an async endpoint.
    session = RequestScoped(unit_of_work, session_factory)

    users = providers.Factory(UserRepository, session=session)
    notes = providers.Factory(NoteRepository, session=session)
    service = providers.Factory(NotesService, users=users, notes=notes)
