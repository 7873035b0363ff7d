"""The container: one Session per request, shared by the views, the service and its repositories."""

from __future__ import annotations

from collections.abc import Iterator

from dependency_injector import containers, providers
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from di_request_scope import RequestScoped
from di_request_scope.sqlalchemy import managed_engine, unit_of_work

from .models import Base
from .repositories import ExportRepository, OrderRepository, ProductRepository
from .services import ShopService


def create_schema(engine: Engine) -> Iterator[None]:
    Base.metadata.create_all(engine)
    yield


# --8<-- [start:container]
class Container(containers.DeclarativeContainer):
    wiring_config = containers.WiringConfiguration(modules=[".views"])

    config = providers.Configuration()
    engine = providers.Resource(managed_engine, config.database_url)
    schema = providers.Resource(create_schema, engine)
    session_factory = providers.Singleton(sessionmaker, bind=engine)

    # One Session per request: committed when the view starts a 2xx, rolled back on failure.
    session = RequestScoped(unit_of_work, session_factory)

    products = providers.Factory(ProductRepository, session=session)
    orders = providers.Factory(OrderRepository, session=session)
    exports = providers.Factory(ExportRepository, session=session)
    service = providers.Factory(ShopService, products=products, orders=orders, exports=exports)


# --8<-- [end:container]
