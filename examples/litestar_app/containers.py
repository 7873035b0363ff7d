"""The container: the notes service's repositories and service, one Session per request.

No wiring: Litestar injects through its own dependency system (see dependencies.py),
so each app holds its own container and several apps can live in one process.
"""

from __future__ import annotations

from dependency_injector import containers, providers
from sqlalchemy.orm import sessionmaker

from di_request_scope import RequestScoped
from di_request_scope.sqlalchemy import managed_engine, unit_of_work

from ..notes_app.containers import create_schema
from ..notes_app.repositories import NoteRepository, UserRepository
from ..notes_app.services import NotesService


class Container(containers.DeclarativeContainer):
    config = providers.Configuration()
    engine = providers.Resource(managed_engine, config.database_url)  # created in the lifespan
    schema = providers.Resource(create_schema, engine)
    session_factory = providers.Singleton(sessionmaker, bind=engine)

    # One Session per request: committed before a 2xx is sent, rolled back on failure.
    session = RequestScoped(unit_of_work, session_factory)

    users = providers.Factory(UserRepository, session=session)
    notes = providers.Factory(NoteRepository, session=session)
    service = providers.Factory(NotesService, users=users, notes=notes)
