"""The container: the same one could serve a web app; here a Celery worker uses it."""

from __future__ import annotations

from dependency_injector import containers, providers
from sqlalchemy.orm import sessionmaker

from di_request_scope import RequestScoped
from di_request_scope.sqlalchemy import managed_engine, unit_of_work

from .repositories import ItemRepository, ReservationRepository
from .services import InventoryService


class Container(containers.DeclarativeContainer):
    config = providers.Configuration()
    # Created on first use, in the process that runs the tasks (each prefork child has its own).
    engine = providers.Resource(managed_engine, config.database_url)
    session_factory = providers.Singleton(sessionmaker, bind=engine)

    # One Session per task execution: committed when the task returns, rolled back when it raises.
    session = RequestScoped(unit_of_work, session_factory)

    items = providers.Factory(ItemRepository, session=session)
    reservations = providers.Factory(ReservationRepository, session=session)
    service = providers.Factory(InventoryService, items=items, reservations=reservations)
