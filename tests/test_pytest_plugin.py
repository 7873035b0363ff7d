"""The pytest plugin: inner test sessions run with pytester, real apps, real SQLite files and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from dependency_injector import containers, providers
from sqlalchemy import Column, MetaData, String, Table, create_engine, event, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

import di_request_scope.pytest_plugin
from di_request_scope import RequestScoped, request_scope
from di_request_scope.sqlalchemy import unit_of_work
from di_request_scope.testing import (
    AsyncRolledBackTransaction,
    Overrides,
    RolledBackTransaction,
    override,
    override_providers,
)

pytest_plugins = ["pytester"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def run_inner(pytester: pytest.Pytester, *args: str, plugins: str = "") -> pytest.RunResult:
    """Run the inner session in-process, warnings as errors, as the project's own suite runs.

    Other installed plugins that are slow to configure (hypothesis, faker) are off unless asked for.
    """
    off = " ".join(f"-p no:{name}" for name in ("hypothesispytest", "faker") if name not in plugins)
    pytester.makeini(f"[pytest]\nfilterwarnings = error\naddopts = -p no:cacheprovider {off}\n")
    return pytester.runpytest(*args)


# --- loading ------------------------------------------------------------------------------------


def test_pytest_loads_the_plugin_through_its_entry_point(pytestconfig: pytest.Config) -> None:
    (entry,) = [ep for ep in entry_points(group="pytest11") if ep.name == "di_request_scope"]
    assert entry.value == "di_request_scope.pytest_plugin"
    assert pytestconfig.pluginmanager.get_plugin("di_request_scope") is di_request_scope.pytest_plugin


IMPORTS = """
import sys
import di_request_scope
core = set(sys.modules)
import di_request_scope.pytest_plugin
plugin = set(sys.modules) - core
import di_request_scope.testing
helpers = set(sys.modules) - core - plugin
print(",".join(sorted(plugin)))
print(",".join(sorted(helpers)))
"""


def test_importing_the_plugin_or_the_helpers_imports_no_optional_integration() -> None:
    """pytest imports the plugin in every session where the package is installed: it adds nothing.

    Measured against the core package, which may import FastAPI through
    dependency-injector's wiring module when FastAPI is installed.
    """
    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True).stdout
    plugin, helpers = (set(line.split(",")) for line in out.splitlines())
    optional = {"sqlalchemy", "fastapi", "starlette", "httpx", "greenlet"}
    assert not {m for m in plugin | helpers if m.split(".")[0] in optional}
    assert "di_request_scope.pytest_plugin" in plugin
    assert "di_request_scope.testing" not in plugin  # the fixtures import it when they run
    assert helpers == {"di_request_scope.testing"}  # SQLAlchemy only once a transaction opens


def test_the_plugin_can_be_turned_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_uses_it(di_scope):\n    pass\n")
    result = run_inner(pytester, "-p", "no:di_request_scope")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'di_scope' not found*"])


# --- di_scope -----------------------------------------------------------------------------------

SCOPE_TESTS = """
import pytest
from di_request_scope import NoRequestScopeError, RequestScoped, current_scope

LOG = []


def recorded(name):
    def gen():
        try:
            yield object()
        except BaseException as exc:
            LOG.append((name, type(exc).__name__))
            raise
        LOG.append((name, "ok"))

    return gen


passing = RequestScoped(recorded("passing"))
failing = RequestScoped(recorded("failing"))


def test_1_one_instance_for_the_whole_test(di_scope):
    assert passing() is passing()
    assert current_scope() is not None


def test_2_a_failing_test_hands_its_exception_to_finalizers(di_scope):
    failing()
    assert False, "failing on purpose"


def test_3_teardown_followed_each_test_with_its_outcome():
    assert LOG == [("passing", "ok"), ("failing", "AssertionError")]


def test_4_a_test_without_the_fixture_has_no_scope():
    with pytest.raises(NoRequestScopeError):
        passing()


def broken_teardown():
    yield "x"
    raise RuntimeError("close failed")


broken = RequestScoped(broken_teardown)


def test_5_a_teardown_error_fails_the_test(di_scope):
    broken()


class TestInAClass:
    def test_6_methods_too(self, di_scope):
        assert passing() is passing()
"""


def test_di_scope_runs_a_sync_test_in_one_scope_torn_down_with_its_outcome(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_scope=SCOPE_TESTS)
    result = run_inner(pytester, "-v")
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_2_a_failing_test_hands_its_exception_to_finalizers FAILED*",
            "*test_5_a_teardown_error_fails_the_test FAILED*",
            "*RuntimeError: close failed*",
        ]
    )


ASYNC_SCOPE_TESTS = """
import asyncio

import pytest
from di_request_scope import RequestScoped, current_scope

LOG = []


async def connection():
    loop = asyncio.get_running_loop()
    try:
        yield loop
    except BaseException as exc:
        LOG.append(type(exc).__name__)
        raise
    LOG.append("ok")


conn = RequestScoped(connection)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_1_an_async_instance_lives_on_the_test_loop(di_scope):
    assert await conn() is asyncio.get_running_loop()
    assert await conn() is await conn()


@pytest.mark.anyio
async def test_2_failing(di_scope):
    await conn()
    raise KeyError("failing on purpose")


def test_3_torn_down_after_each_async_test():
    assert LOG == ["ok", "KeyError"]
"""


def test_di_scope_runs_an_async_test_in_a_scope_on_its_event_loop(pytester: pytest.Pytester) -> None:
    """A sync `with request_scope()` refuses async instances: these need the scope the hook opens."""
    pytester.makepyfile(test_async_scope=ASYNC_SCOPE_TESTS)
    result = run_inner(pytester, "-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_2_failing* FAILED*"])


HYPOTHESIS_TESTS = """
from hypothesis import HealthCheck, given, settings, strategies as st
from di_request_scope import RequestScoped

made = []
thing = RequestScoped(object)


@settings(max_examples=5, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers())
def test_each_example(di_scope, number):
    made.append(thing())
    assert thing() is made[-1]


def test_one_scope_per_example():
    assert len(made) == 5
    assert len(set(map(id, made))) == 5
"""


def test_di_scope_gives_each_hypothesis_example_its_own_scope(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_hypothesis=HYPOTHESIS_TESTS)
    run_inner(pytester, plugins="hypothesispytest").assert_outcomes(passed=2)


def test_di_scope_applies_when_an_autouse_fixture_requests_it(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        "import pytest\n\n@pytest.fixture(autouse=True)\ndef _scoped(di_scope):\n    pass\n"
    )
    pytester.makepyfile(
        "from di_request_scope import current_scope\n\ndef test_in_scope():\n    assert current_scope()\n"
    )
    run_inner(pytester).assert_outcomes(passed=1)


# --- di_override and override() -----------------------------------------------------------------

OVERRIDE_TESTS = """
from dependency_injector import containers, providers


class Container(containers.DeclarativeContainer):
    greeting = providers.Object("hello")
    greeter = providers.Callable(str.upper, greeting)


container = Container()


def test_1_overridden_and_failing(di_override):
    di_override(container.greeting, "bonjour")
    di_override.providers(container, greeter=providers.Callable(str.title, container.greeting))
    assert container.greeting() == "bonjour"
    assert container.greeter() == "Bonjour"
    assert False, "failing on purpose"


def test_2_the_next_test_sees_the_originals():
    assert container.greeting() == "hello"
    assert container.greeter() == "HELLO"
"""


def test_di_override_lasts_for_one_test_even_when_it_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_override=OVERRIDE_TESTS)
    run_inner(pytester).assert_outcomes(passed=1, failed=1)


class Repository:
    def __init__(self, session: object) -> None:
        self.session = session


class Service:
    def __init__(self, repository: Repository) -> None:
        self.repository = repository


async def async_session() -> AsyncIterator[str]:
    yield "async session"


class AsyncContainer(containers.DeclarativeContainer):
    session = RequestScoped(async_session)
    repository = providers.Factory(Repository, session=session)
    service = providers.Factory(Service, repository=repository)


@pytest.mark.anyio
async def test_override_restores_the_async_mode_a_sync_stand_in_pinned() -> None:
    container = AsyncContainer()
    with override(container.repository, Repository("fake")):
        assert container.repository().session == "fake"  # a sync result: pins the mode to sync
    async with request_scope():
        repository = await container.repository()  # async again: the session is awaited
    assert repository.session == "async session"


@pytest.mark.anyio
async def test_override_providers_restores_the_async_mode_of_every_provider() -> None:
    """A service built only from sync stand-ins is pinned to sync too; the container form undoes that."""
    container = AsyncContainer()
    with override_providers(container, repository=providers.Factory(Repository, session="fake")):
        assert container.service().repository.session == "fake"
    async with request_scope():
        service = await container.service()
    assert service.repository.session == "async session"


def test_override_removes_overrides_stacked_on_it_and_accepts_plain_objects() -> None:
    container = AsyncContainer()
    with override(container.repository, Repository("mine")) as mine:
        assert isinstance(mine, providers.Object)
        container.repository.override(providers.Object(Repository("left behind")))
    assert container.repository.overridden == ()


def test_override_removes_its_override_when_the_block_raises() -> None:
    container = AsyncContainer()
    with pytest.raises(KeyError), override(container.repository, Repository("fake")):
        raise KeyError("test failed")
    assert container.repository.overridden == ()


def test_overrides_reset_undoes_them_last_first() -> None:
    container = AsyncContainer()
    overrides = Overrides()
    overrides(container.repository, Repository("first"))
    overrides(container.repository, Repository("second"))
    assert container.repository().session == "second"
    overrides.reset()
    assert container.repository.overridden == ()


def test_override_providers_names_the_providers_when_one_is_unknown() -> None:
    with (
        pytest.raises(
            AttributeError, match=r"AsyncContainer has no provider 'repo'; its providers are .*repository"
        ),
        override_providers(AsyncContainer(), repo=Repository("x")),
    ):
        pass


# --- transactions: a real app in inner sessions -------------------------------------------------

APP = """
from dependency_injector import containers, providers
from fastapi import FastAPI, HTTPException
from sqlalchemy import Column, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from di_request_scope import RequestScoped, RequestScopeMiddleware
from di_request_scope.sqlalchemy import unit_of_work

URL = {url!r}
ASYNC_URL = {async_url!r}
metadata = MetaData()
items = Table({table!r}, metadata, Column("name", String(50), unique=True))


class Container(containers.DeclarativeContainer):
    engine = providers.Singleton(create_engine, URL)
    session_factory = providers.Singleton(sessionmaker, bind=engine)
    session = RequestScoped(unit_of_work, session_factory)


class AsyncContainer(containers.DeclarativeContainer):
    engine = providers.Singleton(create_async_engine, ASYNC_URL)
    session_factory = providers.Singleton(async_sessionmaker, bind=engine)
    session = RequestScoped(unit_of_work, session_factory)


def create_app():
    container = Container()
    app = FastAPI()
    app.state.container = container
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/items/{{name}}", status_code=201)
    def add(name: str, fail: bool = False) -> dict:
        session = container.session()
        session.execute(insert(items).values(name=name))
        if fail:
            raise HTTPException(409, "failed after the insert")
        return {{"names": sorted(session.scalars(select(items.c.name)))}}

    return app


def create_async_app():
    container = AsyncContainer()
    app = FastAPI()
    app.state.container = container
    app.add_middleware(RequestScopeMiddleware)

    @app.post("/items/{{name}}", status_code=201)
    async def add(name: str, fail: bool = False) -> dict:
        session = await container.session()
        await session.execute(insert(items).values(name=name))
        if fail:
            raise HTTPException(409, "failed after the insert")
        return {{"names": sorted(await session.scalars(select(items.c.name)))}}

    return app
"""

SYNC_APP_TESTS = """
import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from inner_app import URL, create_app, items


@pytest.fixture(scope="session")
def di_engine():
    from sqlalchemy import create_engine

    engine = create_engine(URL)
    yield engine
    engine.dispose()


@pytest.fixture
def client(di_transaction):
    app = create_app()
    di_transaction.bind(app.state.container.session_factory)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def names(di_transaction):
    return sorted(di_transaction.connection.execute(select(items.c.name)).scalars())


def test_1_the_test_sees_what_the_app_committed(client, di_transaction):
    assert client.post("/items/ada").json() == {"names": ["ada"]}
    assert client.post("/items/bob").json() == {"names": ["ada", "bob"]}
    assert names(di_transaction) == ["ada", "bob"]


def test_2_a_failed_request_rolls_back_only_its_own_writes(client, di_transaction):
    assert names(di_transaction) == []  # test_1's rows are gone
    assert client.post("/items/ada").status_code == 201
    assert client.post("/items/bob", params={"fail": True}).status_code == 409
    assert client.post("/items/ada").status_code == 500  # unique violation: the commit fails
    assert client.post("/items/carol").status_code == 201  # the transaction is still usable
    assert names(di_transaction) == ["ada", "carol"]


def test_3_a_failing_test_leaves_nothing_either(client):
    assert client.post("/items/dan").status_code == 201
    assert False, "failing on purpose"
"""

ASYNC_APP_TESTS = """
import httpx
import pytest
from sqlalchemy import select

from inner_app import ASYNC_URL, create_async_app, items


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def di_engine():
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    return create_async_engine(ASYNC_URL, poolclass=NullPool)


@pytest.fixture
async def client(di_async_transaction):
    app = create_async_app()
    di_async_transaction.bind(app.state.container.session_factory)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        yield client


async def names(di_async_transaction):
    return sorted((await di_async_transaction.connection.execute(select(items.c.name))).scalars())


@pytest.mark.anyio
async def test_1_the_test_sees_what_the_app_committed(client, di_async_transaction):
    assert (await client.post("/items/ada")).json() == {"names": ["ada"]}
    assert (await client.post("/items/bob")).json() == {"names": ["ada", "bob"]}
    assert await names(di_async_transaction) == ["ada", "bob"]


@pytest.mark.anyio
async def test_2_a_failed_request_rolls_back_only_its_own_writes(client, di_async_transaction):
    assert await names(di_async_transaction) == []
    assert (await client.post("/items/ada")).status_code == 201
    assert (await client.post("/items/bob", params={"fail": True})).status_code == 409
    assert (await client.post("/items/ada")).status_code == 500  # unique violation
    assert (await client.post("/items/carol")).status_code == 201  # the transaction is still usable
    assert await names(di_async_transaction) == ["ada", "carol"]


@pytest.mark.anyio
async def test_3_a_failing_test_leaves_nothing_either(client):
    assert (await client.post("/items/dan")).status_code == 201
    assert False, "failing on purpose"
"""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, unique_name: str
) -> Iterator[tuple[str, str, Table]]:
    """(sync URL, async URL, table): a fresh table on a SQLite file or on the PostgreSQL server."""
    if request.param == "sqlite":
        url, async_url = f"sqlite:///{tmp_path}/app.sqlite3", f"sqlite+aiosqlite:///{tmp_path}/app.sqlite3"
    else:
        url = async_url = request.getfixturevalue("postgres_url")  # psycopg 3: sync and async
    table = Table(unique_name, MetaData(), Column("name", String(50), unique=True))
    engine = create_engine(url, poolclass=NullPool)
    table.create(engine)
    try:
        yield url, async_url, table
    finally:
        table.drop(engine)
        engine.dispose()


def rows_seen_by_another_connection(url: str, table: Table) -> list[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return sorted(conn.execute(select(table.c.name)).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_apps_writes_are_seen_in_the_test_and_gone_after_it(
    pytester: pytest.Pytester, database: tuple[str, str, Table], kind: str
) -> None:
    """A real FastAPI app with the middleware and unit_of_work; checked from outside after the session."""
    url, async_url, table = database
    pytester.makepyfile(inner_app=APP.format(url=url, async_url=async_url, table=table.name))
    pytester.makepyfile(test_app=SYNC_APP_TESTS if kind == "sync" else ASYNC_APP_TESTS)
    result = run_inner(pytester, "-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_3_a_failing_test_leaves_nothing_either* FAILED*"])
    assert rows_seen_by_another_connection(url, table) == []


def test_the_transaction_fixtures_say_what_they_need(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_no_engine(di_transaction):
            pass

        @pytest.fixture
        def di_engine():
            from sqlalchemy.ext.asyncio import create_async_engine
            return create_async_engine("sqlite+aiosqlite://")

        def test_an_async_engine(di_transaction):
            pass
        """
    )
    pytester.makepyfile(
        test_elsewhere="def test_no_engine_here(di_transaction):\n    pass\n",
    )
    result = run_inner(pytester)
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*define a fixture named `di_engine`*",
            "*this is an AsyncEngine: use AsyncRolledBackTransaction (di_async_transaction)*",
        ]
    )


# --- transactions: direct -----------------------------------------------------------------------


@pytest.fixture
def sqlite_table(sqlite_url: str) -> tuple[Engine, Table]:
    table = Table("items", MetaData(), Column("name", String(50), unique=True))
    engine = create_engine(sqlite_url)
    table.create(engine)
    return engine, table


def with_sqlalchemys_recipe(engine: Engine) -> Engine:
    """SQLAlchemy's documented pysqlite SAVEPOINT recipe: BEGIN emitted by an engine event."""

    @event.listens_for(engine, "connect")
    def no_pysqlite_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine


@pytest.mark.parametrize("recipe", [False, True], ids=["plain-pysqlite", "sqlalchemy-recipe"])
def test_on_sqlite_a_commit_inside_never_commits_the_outer_transaction(
    sqlite_url: str, sqlite_table: tuple[Engine, Table], recipe: bool
) -> None:
    """pysqlite defers BEGIN: without an explicit one, the first RELEASE SAVEPOINT would commit."""
    engine, table = sqlite_table
    if recipe:
        engine = with_sqlalchemys_recipe(create_engine(sqlite_url))
    with RolledBackTransaction(engine) as tx, tx.session_factory() as session:
        session.execute(insert(table).values(name="ada"))
        session.commit()
        with session.begin_nested():  # the app's own savepoints nest inside
            session.execute(insert(table).values(name="bob"))
        session.commit()
        assert sorted(tx.connection.execute(select(table.c.name)).scalars()) == ["ada", "bob"]
    engine.dispose()
    assert rows_seen_by_another_connection(sqlite_url, table) == []


@pytest.mark.anyio
async def test_on_aiosqlite_a_commit_inside_never_commits_the_outer_transaction(
    sqlite_url: str, sqlite_table: tuple[Engine, Table]
) -> None:
    _, table = sqlite_table
    engine = create_async_engine(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"), poolclass=NullPool)
    async with AsyncRolledBackTransaction(engine) as tx, tx.session_factory() as session:
        await session.execute(insert(table).values(name="ada"))
        await session.commit()
    await engine.dispose()
    assert rows_seen_by_another_connection(sqlite_url, table) == []


def make_session_class() -> type[Session]:
    class AppSession(Session):
        pass

    return AppSession


def test_bind_keeps_the_apps_session_options(sqlite_table: tuple[Engine, Table]) -> None:
    engine, table = sqlite_table
    app_session = make_session_class()
    module_level = sessionmaker(bind=engine, class_=app_session, autoflush=False)

    class Container(containers.DeclarativeContainer):
        session_factory = providers.Singleton(
            sessionmaker, bind=providers.Object(engine), expire_on_commit=False
        )
        session = RequestScoped(unit_of_work, session_factory)
        plain = RequestScoped(module_level)

    container = Container()
    with RolledBackTransaction(engine) as tx:
        tx.bind(container.session_factory, container.plain)
        with request_scope():
            session, plain = container.session(), container.plain()
            assert session.bind is tx.connection
            assert session.expire_on_commit is False  # from the Singleton's keyword arguments
            assert plain.bind is tx.connection
            assert isinstance(plain, app_session)  # from the sessionmaker itself
            assert plain.autoflush is False
            session.execute(insert(table).values(name="ada"))
        assert tx.connection.execute(select(table.c.name)).scalars().all() == ["ada"]
    assert container.session_factory.overridden == ()
    assert container.plain.overridden == ()
    engine.dispose()


def test_bind_a_request_scoped_unit_of_work_over_a_module_level_sessionmaker(
    sqlite_url: str, sqlite_table: tuple[Engine, Table]
) -> None:
    """The README's quick start has no session_factory provider: bind the RequestScoped itself."""
    engine, table = sqlite_table
    session_local = sessionmaker(bind=engine)

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(unit_of_work, session_local, offload=False)

    container = Container()
    with RolledBackTransaction(engine) as tx:
        tx.bind(container.session)
        assert container.session.last_overriding.kwargs == {"offload": False}  # the app's arguments kept
        with request_scope():
            container.session().execute(insert(table).values(name="ada"))  # committed at exit
        with pytest.raises(KeyError), request_scope():
            container.session().execute(insert(table).values(name="bob"))
            raise KeyError("rolled back")
        assert tx.connection.execute(select(table.c.name)).scalars().all() == ["ada"]
    engine.dispose()
    assert rows_seen_by_another_connection(sqlite_url, table) == []


def test_bind_refuses_providers_that_make_no_sessions_or_the_other_kind(
    sqlite_table: tuple[Engine, Table],
) -> None:
    engine, _ = sqlite_table

    class Container(containers.DeclarativeContainer):
        repository = providers.Factory(Repository, session=None)
        engine = providers.Singleton(create_engine, "sqlite://")
        async_factory = providers.Singleton(async_sessionmaker)
        async_session = RequestScoped(unit_of_work, async_factory)
        something = RequestScoped(async_session)

    container = Container()
    with RolledBackTransaction(engine) as tx:
        with pytest.raises(TypeError, match="provides Repository, not a sessionmaker"):
            tx.bind(container.repository)
        with pytest.raises(TypeError, match="provides create_engine, not a sessionmaker"):
            tx.bind(container.engine)  # a function, not a class: still refused
        with pytest.raises(
            TypeError, match="makes AsyncSession objects: bind it to an AsyncRolledBackTransaction"
        ):
            tx.bind(container.async_factory)
        with pytest.raises(TypeError, match="makes AsyncSession objects"):
            tx.bind(container.async_session)
        with pytest.raises(TypeError, match=r"cannot tell how Container\.something makes its session"):
            tx.bind(container.something)
    with pytest.raises(RuntimeError, match="bind\\(\\) needs an open transaction"):
        tx.bind(container.async_factory)
    with pytest.raises(ValueError, match="needs join_transaction_mode='create_savepoint'"):
        RolledBackTransaction(engine, join_transaction_mode="conservative_savepoint")
    engine.dispose()


@pytest.mark.anyio
async def test_an_async_bind_refuses_a_sync_sessionmaker(sqlite_url: str) -> None:
    engine = create_async_engine(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"), poolclass=NullPool)

    class Container(containers.DeclarativeContainer):
        session_factory = providers.Singleton(sessionmaker)

    async with AsyncRolledBackTransaction(engine) as tx:
        with pytest.raises(TypeError, match="makes sync Session objects: bind it to a RolledBackTransaction"):
            tx.bind(Container().session_factory)
        async with tx.session_factory() as session:
            assert isinstance(session, AsyncSession)
            assert (await session.execute(text("SELECT 1"))).scalar() == 1
    await engine.dispose()


@pytest.mark.postgres
def test_on_postgres_a_failed_statement_leaves_the_test_transaction_usable(
    postgres_url: str, unique_name: str
) -> None:
    """PostgreSQL aborts a transaction on error; the app's savepoint is what keeps the test's alive."""
    table = Table(unique_name, MetaData(), Column("name", String(50), unique=True))
    engine = create_engine(postgres_url, poolclass=NullPool)
    table.create(engine)
    try:
        with RolledBackTransaction(engine) as tx:
            with tx.session_factory() as session:
                session.execute(insert(table).values(name="ada"))
                session.commit()
                with pytest.raises(Exception, match="duplicate key"):
                    session.execute(insert(table).values(name="ada"))
                session.rollback()
            assert tx.connection.execute(select(table.c.name)).scalars().all() == ["ada"]
        assert rows_seen_by_another_connection(postgres_url, table) == []
    finally:
        table.drop(engine)
        engine.dispose()
