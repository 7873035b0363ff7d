"""A WebSocket endpoint with a unit of work per message, not per connection.

Each text message is a note to save. With `websocket_scope="message"` every message gets a
Session of its own: committed just before the endpoint's reply to it is sent, rolled back if
handling it fails, closed before the endpoint waits for the next message. A client connected
for hours therefore holds no database connection between its messages.

    uvicorn examples.websocket_notes:app    # then send text frames to ws://127.0.0.1:8000/notes
"""

from __future__ import annotations

from collections.abc import Iterator

from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject
from fastapi import FastAPI, WebSocket
from sqlalchemy import Engine, String
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from starlette.concurrency import run_in_threadpool

from di_request_scope import RequestScoped, RequestScopeMiddleware, container_lifespan, current_scope
from di_request_scope.sqlalchemy import managed_engine, unit_of_work


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "ws_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200), unique=True)


def create_tables(engine: Engine) -> Iterator[None]:
    Base.metadata.create_all(engine)
    yield


class Container(containers.DeclarativeContainer):
    config = providers.Configuration()
    engine = providers.Resource(managed_engine, config.database_url)
    tables = providers.Resource(create_tables, engine)
    session_factory = providers.Singleton(sessionmaker, bind=engine)
    session = RequestScoped(unit_of_work, session_factory)  # one per message


# --8<-- [start:endpoint]
@inject
def save_note(text: str, session: Session = Provide[Container.session]) -> int:
    note = Note(text=text)
    session.add(note)
    session.flush()  # a duplicate fails here, where the endpoint can answer it
    return note.id


async def notes(websocket: WebSocket) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():  # each message: a scope, and a Session, of its own
        try:
            note_id = await run_in_threadpool(save_note, text)  # the thread sees the message's scope
        except IntegrityError as exc:
            current_scope().fail(exc)  # caught, so say so: this message rolls back
            await websocket.send_json({"error": f"{text!r} is already saved"})
        else:
            await websocket.send_json({"id": note_id})  # sent once the note is committed


def create_app(database_url: str = "sqlite:///websocket_notes.sqlite3") -> FastAPI:
    container = Container()
    container.config.database_url.from_value(database_url)
    app = FastAPI(lifespan=container_lifespan(container))
    app.add_middleware(RequestScopeMiddleware, websocket_scope="message")
    app.add_api_websocket_route("/notes", notes)
    app.state.container = container
    container.wire(modules=[__name__])
    return app


# --8<-- [end:endpoint]

app = create_app()
