"""The failure modes the README attributes to the usual approaches, shown side by side with ours.

Each test runs the peer approach and RequestScoped in the same real app, so the README's
comparison claims only what these tests show.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from dependency_injector import containers, providers
from fastapi import Depends, FastAPI
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.orm import Session, registry, sessionmaker

from di_request_scope import RequestScoped, RequestScopeMiddleware
from di_request_scope.sqlalchemy import unit_of_work


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def build_split_app(db: providers.Provider[Any]) -> FastAPI:
    """The first resolution happens in a sync dependency, FastAPI's threadpool."""
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    def sync_dependency() -> object:
        return db()

    @app.get("/")
    async def endpoint(first: object = Depends(sync_dependency)) -> dict[str, bool]:
        return {"same": db() is first}

    return app


@pytest.mark.anyio
async def test_context_local_singleton_splits_a_request_first_resolved_in_a_sync_dependency() -> None:
    """ContextLocalSingleton stores in the threadpool's context copy: the endpoint gets a second object."""

    class Peer(containers.DeclarativeContainer):
        db = providers.ContextLocalSingleton(object)

    class Ours(containers.DeclarativeContainer):
        db = RequestScoped(object)

    async with client(build_split_app(Peer().db)) as peer, client(build_split_app(Ours().db)) as ours:
        assert (await peer.get("/")).json() == {"same": False}
        assert (await ours.get("/")).json() == {"same": True}


@pytest.mark.anyio
async def test_fastapi_yield_dependency_answers_2xx_for_a_failed_commit(tmp_path: Any) -> None:
    """`Depends(get_db)` commits after the response: a failed commit still answers 201; ours answers 500."""
    engine = create_engine(f"sqlite:///{tmp_path / 'peers.sqlite3'}")
    metadata = MetaData()
    table = Table(
        "notes", metadata, Column("id", Integer, primary_key=True), Column("text", String, unique=True)
    )
    metadata.create_all(engine)

    class Note:
        def __init__(self, text: str) -> None:
            self.text = text

    registry().map_imperatively(Note, table)
    SessionLocal = sessionmaker(bind=engine)

    def get_db() -> Iterator[Session]:
        with SessionLocal() as session:
            yield session
            session.commit()

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, SessionLocal)

    container = Container()
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/peer/{text}", status_code=201)
    def peer_add(text: str, session: Session = Depends(get_db)) -> dict[str, str]:
        session.add(Note(text))
        return {"added": text}

    @app.post("/ours/{text}", status_code=201)
    def our_add(text: str) -> dict[str, str]:
        container.session().add(Note(text))
        return {"added": text}

    def stored() -> list[str]:
        with engine.connect() as conn:
            return sorted(conn.execute(select(table.c.text)).scalars())

    async with client(app) as http:
        assert (await http.post("/peer/a")).status_code == 201
        assert (await http.post("/peer/a")).status_code == 201  # the commit failed: 201 all the same
        assert (await http.post("/ours/b")).status_code == 201
        assert (await http.post("/ours/b")).status_code == 500  # duplicate: the client is told
    assert stored() == ["a", "b"]
    engine.dispose()
