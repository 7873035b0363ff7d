"""An app run by a real uvicorn in a subprocess: its engine lives in the container and the lifespan.

Each worker names its PostgreSQL connections "<APP_NAME>-<pid>", so a test can count
what a given process left open in pg_stat_activity.
"""

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from dependency_injector import containers, providers
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from di_request_scope import RequestScoped, RequestScopeMiddleware, container_lifespan
from di_request_scope.sqlalchemy import managed_engine, unit_of_work

VERSION = 1


class Container(containers.DeclarativeContainer):
    engine = providers.Resource(
        managed_engine,
        os.environ["APP_DB_URL"],
        connect_args={"application_name": f"{os.environ['APP_NAME']}-{os.getpid()}"},
    )
    session = RequestScoped(unit_of_work, providers.Singleton(sessionmaker, bind=engine))


container = Container()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with container_lifespan(container)(app):
        engine = container.engine()
        yield
    # After shutdown_resources(): the test reads this line from the worker's stderr.
    print(f"pooled connections after shutdown: {engine.pool.checkedin()}", file=sys.stderr, flush=True)


app = FastAPI(lifespan=lifespan)
app.add_middleware(RequestScopeMiddleware)


@app.get("/")
def index() -> dict[str, int]:
    one = container.session().execute(text("SELECT 1")).scalar_one()
    return {"pid": os.getpid(), "version": VERSION, "one": one}
