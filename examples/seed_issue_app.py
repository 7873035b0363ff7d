"""The app from dependency-injector's "Single Database Session Per FastAPI Request" issue, fixed.

The only changes: `providers.Factory(SessionLocal)` became `RequestScoped(SessionLocal)`,
the app got `RequestScopeMiddleware`, and the response also carries `session_key`
(SQLAlchemy's `Session.hash_key`, unique per session, unlike `id()`, which Python
reuses). Both parameters now hold the same session, and the next request gets a new
one, for async and sync endpoints alike.

Run it: `python -m examples.seed_issue_app`, then open http://127.0.0.1:5000/
"""

from __future__ import annotations

from dependency_injector import containers
from dependency_injector.wiring import Provide, inject
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine
from sqlalchemy.orm import declarative_base, sessionmaker

from di_request_scope import RequestScoped, RequestScopeMiddleware

engine = create_engine("sqlite://")

Base = declarative_base()
Base.metadata.create_all(engine)
SessionLocal = sessionmaker(bind=engine)


class ApplicationContainer(containers.DeclarativeContainer):
    wiring_config = containers.WiringConfiguration(modules=[__name__])
    database = RequestScoped(SessionLocal)


app = FastAPI()
app.add_middleware(RequestScopeMiddleware)


@app.get("/")
@inject
async def root(
    session_1=Depends(Provide[ApplicationContainer.database]),
    session_2=Depends(Provide[ApplicationContainer.database]),
) -> dict[str, int]:
    return {"session_1_id": id(session_1), "session_2_id": id(session_2), "session_key": session_1.hash_key}


@app.get("/sync")
@inject
def root_sync(
    session_1=Depends(Provide[ApplicationContainer.database]),
    session_2=Depends(Provide[ApplicationContainer.database]),
) -> dict[str, int]:
    """The case that failed for the issue's users under concurrent load: a sync endpoint."""
    return {"session_1_id": id(session_1), "session_2_id": id(session_2), "session_key": session_1.hash_key}


container = ApplicationContainer()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=5000, log_level="info")
