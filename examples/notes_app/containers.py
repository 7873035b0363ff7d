"""The container: the engine lives here and is created in the app's lifespan."""

from __future__ import annotations

from collections.abc import Iterator

from dependency_injector import containers, providers
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from di_request_scope import RequestScoped
from di_request_scope.sqlalchemy import managed_engine, unit_of_work

from .models import Base
from .repositories import NoteRepository, UserRepository
from .services import NotesService


def create_schema(engine: Engine) -> Iterator[None]:
    Base.metadata.create_all(engine)
    yield


class Container(containers.DeclarativeContainer):
    wiring_config = containers.WiringConfiguration(modules=[".routes"])

    config = providers.Configuration()
    engine = providers.Resource(managed_engine, config.database_url)
    schema = providers.Resource(create_schema, engine)
    session_factory = providers.Singleton(sessionmaker, bind=engine)

    # One Session per request: committed before a 2xx is sent, rolled back on failure.
    session = RequestScoped(unit_of_work, session_factory)

    users = providers.Factory(UserRepository, session=session)
    notes = providers.Factory(NoteRepository, session=session)
    service = providers.Factory(NotesService, users=users, notes=notes)
