"""The candidate apps of ``bench_server``, as factories uvicorn loads: ``benchmarks._server_apps:<name>``.

    python -m uvicorn benchmarks._server_apps:request_scoped --factory --port 8000
    python -m benchmarks._server_apps   # the fork server bench_server starts its uvicorns from

Each factory binds ``bench_asgi``'s two sessionmakers (the peers' and
RequestScoped's) to its engine and returns one of ``bench_asgi``'s apps,
unchanged: the same endpoints, middleware and dependencies as the in-process
benchmark, so the two measure the same code. One candidate per server process,
so the module-level sessionmakers are this process's alone.

The read factories (``bare``, ``request_scoped``, ...) use SQLite in memory
with one shared connection (``StaticPool``), as ``bench_asgi`` does: ``/async``
and ``/sync`` run ``SELECT 1``.

The ``write_*`` factories add two routes to the same apps, for the event-loop
latency benchmark: ``/write``, a ``def`` endpoint (FastAPI's threadpool) that
inserts a row through the request's session, committed when the request ends,
and ``/ping``, an ``async def`` endpoint that touches no database. They use the
SQLite file named by ``BENCH_SERVER_DB`` with SQLite's default rollback journal
and ``PRAGMA synchronous=FULL``: each commit waits for fsyncs, milliseconds on
a disk, as a commit to a remote database waits for the network. SQLite has one
writer, so the pool holds one connection and requests queue for it in Python
(a ``pool_timeout`` of 60 s, never reached in a run).

Importing this module (FastAPI, SQLAlchemy, dishka, that-depends,
dependency-injector) takes one to three seconds of CPU, ten times over for ten
servers: too slow for the CI smoke run on two cores. So :func:`fork_server`
imports it once and forks one child per server, each of which calls
``uvicorn.run()`` with the arguments of the command line above (what
``python -m uvicorn`` itself calls). Each server is still its own process
with its own event loop and nothing shared.
"""

# No `from __future__ import annotations`: dependency-injector's @inject reads the
# Annotated[..., Depends(Provide[...])] markers from the evaluated signature.

import contextlib
import ctypes
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from dependency_injector.wiring import inject
from dishka.integrations.fastapi import FromDishka
from dishka.integrations.fastapi import inject as dishka_inject
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from di_request_scope import RequestScopeMiddleware

from . import bench_asgi
from .bench_asgi import (
    AsyncService,
    BenchAsgiTDContainer,
    Repository,
    RequestScopedContainer,
    Service,
    session_generator,
)

DB_ENV = "BENCH_SERVER_DB"
CREATE_TABLE = "CREATE TABLE IF NOT EXISTS writes (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)"
INSERT_ROW = text("INSERT INTO writes (payload) VALUES ('x')")
# SQLite's defaults, spelled out: a rollback journal, and fsyncs (journal, database) at every commit.
PRAGMAS = ("PRAGMA journal_mode=DELETE", "PRAGMA synchronous=FULL")
OK = {"value": 1}

# Containers live (and stay wired) as long as the server process.
_containers: list[Any] = []


def _memory_engine() -> None:
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    bench_asgi.SessionLocal.configure(bind=engine)
    bench_asgi.UnitOfWorkSessionLocal.configure(bind=engine)


def _file_engine() -> None:
    path = os.environ.get(DB_ENV)
    if not path:
        raise RuntimeError(f"the write apps need the SQLite file's path in ${DB_ENV}; bench_server sets it")
    # check_same_thread=False: dishka and that-depends commit on the event loop a session
    # whose INSERT ran in FastAPI's threadpool.
    engine = create_engine(
        f"sqlite:///{path}",
        pool_size=1,
        max_overflow=0,
        pool_timeout=60,
        connect_args={"check_same_thread": False},
    )
    event.listen(engine, "connect", _pragmas)
    with engine.begin() as connection:
        connection.exec_driver_sql(CREATE_TABLE)
    bench_asgi.SessionLocal.configure(bind=engine)
    bench_asgi.UnitOfWorkSessionLocal.configure(bind=engine)


def _pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


def _request_scoped_container() -> RequestScopedContainer:
    container = RequestScopedContainer()
    container.wire(modules=[bench_asgi, __name__])
    _containers.append(container)
    return container


# --- read apps: bench_asgi's, on SQLite in memory ------------------------------------------


def bare() -> FastAPI:
    _memory_engine()
    return bench_asgi.bare_app()


def bare_middleware() -> FastAPI:
    _memory_engine()
    return bench_asgi.bare_app(middleware=RequestScopeMiddleware)


def depends() -> FastAPI:
    _memory_engine()
    return bench_asgi.depends_app()


def dishka() -> FastAPI:
    _memory_engine()
    app, container = bench_asgi.dishka_app()
    _containers.append(container)
    return app


def that_depends() -> FastAPI:
    _memory_engine()
    return bench_asgi.that_depends_app()


def request_scoped() -> FastAPI:
    _memory_engine()
    _request_scoped_container()
    return bench_asgi.request_scoped_app(bench_asgi.fastapi_provide_async, bench_asgi.fastapi_provide_sync)


def request_scoped_inject() -> FastAPI:
    _memory_engine()
    _request_scoped_container()
    return bench_asgi.request_scoped_app(bench_asgi.hidden_inject_async, bench_asgi.hidden_inject_sync)


def request_scoped_inline_commit() -> FastAPI:
    _memory_engine()
    container = bench_asgi.InlineCommitContainer()
    container.wire(modules=[bench_asgi])
    _containers.append(container)
    return bench_asgi.request_scoped_app(bench_asgi.inline_commit_async, bench_asgi.inline_commit_sync)


READ_FACTORIES: dict[str, Callable[[], FastAPI]] = {
    f.__name__: f
    for f in (
        bare,
        bare_middleware,
        depends,
        dishka,
        that_depends,
        request_scoped,
        request_scoped_inject,
        request_scoped_inline_commit,
    )
}


# --- write apps: the same apps plus /write and /ping, on a SQLite file ----------------------


def insert_row(session: Session) -> dict[str, int]:
    session.execute(INSERT_ROW)  # committed by the candidate when the request ends
    return OK


async def ping() -> dict[str, int]:
    return OK


def _with_write_routes(app: FastAPI, write: Callable[..., dict[str, int]]) -> FastAPI:
    app.get("/write")(write)
    app.get("/ping")(ping)
    return app


@inject
def request_scoped_write(service: AsyncService) -> dict[str, int]:
    return insert_row(service.session)


@dishka_inject
def dishka_write(service: FromDishka[Service]) -> dict[str, int]:
    return insert_row(service.session)


def that_depends_write_endpoint(
    service: Annotated[Service, Depends(BenchAsgiTDContainer.service)],
) -> dict[str, int]:
    return insert_row(service.session)


# FastAPI's tutorial chain, as bench_asgi.depends_app builds it (its functions are local to it).
def get_db() -> Iterator[Session]:
    yield from session_generator()


async def get_repository(session: Annotated[Session, Depends(get_db)]) -> Repository:
    return Repository(session)


async def get_service(
    repository: Annotated[Repository, Depends(get_repository)],
    session: Annotated[Session, Depends(get_db)],
) -> Service:
    return Service(repository, session)


def depends_write_endpoint(service: Annotated[Service, Depends(get_service)]) -> dict[str, int]:
    return insert_row(service.session)


def write_request_scoped() -> FastAPI:
    _file_engine()
    _request_scoped_container()
    app = bench_asgi.request_scoped_app(bench_asgi.fastapi_provide_async, bench_asgi.fastapi_provide_sync)
    return _with_write_routes(app, request_scoped_write)


def write_dishka() -> FastAPI:
    _file_engine()
    app, container = bench_asgi.dishka_app()
    _containers.append(container)
    return _with_write_routes(app, dishka_write)


def write_that_depends() -> FastAPI:
    _file_engine()
    return _with_write_routes(bench_asgi.that_depends_app(), that_depends_write_endpoint)


def write_depends() -> FastAPI:
    _file_engine()
    return _with_write_routes(bench_asgi.depends_app(), depends_write_endpoint)


WRITE_FACTORIES: dict[str, Callable[[], FastAPI]] = {
    f.__name__: f for f in (write_request_scoped, write_dishka, write_that_depends, write_depends)
}


# --- the fork server ---------------------------------------------------------------------------


def _serve_in_child(factory: str, port: int, env: dict[str, str], log: str, parent: int) -> None:
    """Runs in the forked child: one uvicorn server, as ``python -m uvicorn ... --factory`` runs it."""
    import uvicorn

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # uvicorn installs its own once it runs
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the fork server
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the fork server died before prctl took effect
        raise SystemExit(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.update(env)
    uvicorn.run(
        f"{__name__}:{factory}",
        factory=True,
        host="127.0.0.1",
        port=port,
        workers=1,
        access_log=False,
        log_level="warning",
    )


def _stop_children(children: dict[int, str]) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while children and time.monotonic() < deadline:
        for pid in list(children):
            if os.waitpid(pid, os.WNOHANG)[0]:
                del children[pid]
        time.sleep(0.02)
    for pid in children:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    children.clear()


async def _nothing(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that does nothing, for :func:`_preload`."""


def _preload() -> None:
    """Do once, for all children, what each would do first.

    Lazy imports (uvicorn's protocols, loop and lifespan; SQLAlchemy's SQLite
    dialect) and FastAPI's first route cost each child a few hundred ms of CPU.
    """
    import uvicorn

    uvicorn.Config(_nothing, log_level="warning").load()
    create_engine("sqlite://").dispose()
    bench_asgi.bare_app()


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def fork_server() -> int:
    """Read one JSON command per stdin line, answer one JSON line each; stop every child at the end.

    ``{"start": factory, "port": ..., "env": {...}, "log": path}`` forks a server
    and answers its pid; ``{"poll": true}`` answers the children that have
    exited, with their status. End of input, SIGTERM or Ctrl-C stops and reaps
    every child.
    """
    signal.signal(signal.SIGTERM, _terminate)
    _preload()
    children: dict[int, str] = {}
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if "start" in command:
                sys.stdout.flush()
                parent = os.getpid()
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        _serve_in_child(
                            command["start"], command["port"], command["env"], command["log"], parent
                        )
                    except SystemExit as exc:  # uvicorn's own exit on a startup failure
                        code = exc.code if isinstance(exc.code, int) else 1
                    except BaseException:  # noqa: BLE001 - reported in the server's log
                        traceback.print_exc()
                        code = 1
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                children[pid] = command["start"]
                answer: dict[str, Any] = {"pid": pid}
            else:
                exited = {}
                for pid in list(children):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        exited[children.pop(pid)] = os.waitstatus_to_exitcode(status)
                answer = {"exited": exited}
            print(json.dumps(answer), flush=True)
    finally:
        _stop_children(children)
    return 0


if __name__ == "__main__":
    # Run the copy uvicorn imports by name, not this __main__ one.
    from benchmarks._server_apps import fork_server as _fork_server

    sys.exit(_fork_server())
