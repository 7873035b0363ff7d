"""Captive dependencies: a provider created once must not depend on a request-scoped one."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from dependency_injector import containers, providers
from fastapi import FastAPI

from di_request_scope import (
    CaptiveDependencyError,
    RequestScoped,
    RequestScopeMiddleware,
    ScopeMisuseError,
    check_scopes,
    find_captive_dependencies,
    request_scope,
)


class Session:
    """Stands in for a database session: a distinct identity per scope."""


class Repository:
    def __init__(self, session: Any) -> None:
        self.session = session


class Service:
    def __init__(self, repository: Any) -> None:
        self.repository = repository


class SessionUser:
    """Takes the session *provider* and calls it per use: the sound way for a long-lived object."""

    def __init__(self, session_provider: Any) -> None:
        self.session_provider = session_provider


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    "kind",
    [providers.Singleton, providers.ThreadSafeSingleton, providers.ThreadLocalSingleton, providers.Resource],
)
def test_first_resolution_of_a_captured_provider_raises_naming_both(kind: Any) -> None:
    """Resolving the request-scoped provider a long-lived one depends on fails before anything is kept."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Session)
        keeper = kind(Repository, session=db)

    container = Container()
    with request_scope(), pytest.raises(CaptiveDependencyError) as raised:
        container.keeper()
    message = str(raised.value)
    assert f"Container.keeper ({kind.__name__}) -> Container.db (RequestScoped)" in message
    assert "Factory" in message  # says how to fix it
    assert ".provider" in message
    assert isinstance(raised.value, ScopeMisuseError)
    with request_scope(), pytest.raises(CaptiveDependencyError):
        container.db()  # resolving it any other way fails too: the container is unsound


def test_capture_through_factories_names_the_whole_path() -> None:
    """A Singleton that builds a service from a factory of repositories captures their session."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Session)
        repository = providers.Factory(Repository, session=db)
        service = providers.Singleton(Service, repository=repository)

    assert find_captive_dependencies(Container) == [
        "Container.service (Singleton) -> Container.repository (Factory) -> Container.db (RequestScoped)"
    ]
    with pytest.raises(CaptiveDependencyError, match=re.escape("Container.repository (Factory)")):
        check_scopes(Container())


def test_sound_containers_resolve_and_pass_the_check() -> None:
    """Factories, the provider itself, delegated factories and context-local singletons capture nothing."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Session)
        repository = providers.Factory(Repository, session=db)
        uses_provider = providers.Singleton(SessionUser, session_provider=db.provider)
        uses_factory = providers.Singleton(
            SessionUser, session_provider=providers.DelegatedFactory(Repository, db)
        )
        per_context = providers.ContextLocalSingleton(Repository, session=db)

    container = Container()
    assert find_captive_dependencies(container) == []
    check_scopes(container)
    check_scopes(Container)
    with request_scope():
        db = container.db()
        assert container.repository().session is db
        assert container.uses_provider().session_provider() is db
        assert container.uses_factory().session_provider().session is db


def test_only_the_captured_provider_is_refused_at_first_resolution() -> None:
    """Another request-scoped provider of the same container keeps working."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Session)
        cache = RequestScoped(Session)
        keeper = providers.Singleton(Repository, session=db)

    container = Container()
    with request_scope():
        assert isinstance(container.cache(), Session)
        with pytest.raises(CaptiveDependencyError, match=r"Container\.db"):
            container.db()


def test_check_reports_every_capture_including_nested_containers() -> None:
    """One call over the whole container lists each capture, in nested containers too."""

    class Data(containers.DeclarativeContainer):
        db = RequestScoped(Session)

    class App(containers.DeclarativeContainer):
        data = providers.Container(Data)
        first = providers.Singleton(Repository, session=data.db)
        second = providers.Resource(Repository, session=data.db)

    with pytest.raises(CaptiveDependencyError) as raised:
        check_scopes(App())
    assert sorted(raised.value.captures) == [
        "App.first (Singleton) -> App.data.db (RequestScoped)",
        "App.second (Resource) -> App.data.db (RequestScoped)",
    ]


def test_check_refuses_what_is_not_a_container() -> None:
    with pytest.raises(TypeError, match="expected a dependency-injector container"):
        check_scopes(object())


@pytest.mark.anyio
async def test_a_captive_singleton_in_a_fastapi_app_fails_its_first_request_instead_of_leaking() -> None:
    """The request that would have captured the session gets a 500; no later request sees a stale session."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Session)
        repository = providers.Factory(Repository, session=db)
        service = providers.Singleton(Service, repository=repository)

    container = Container()
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/")
    async def endpoint() -> dict[str, int]:
        return {"id": id(container.service().repository.session)}

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/")).status_code == 500
        assert (await client.get("/")).status_code == 500


def test_a_request_scoped_provider_on_a_plain_class_is_not_checked() -> None:
    """Only DeclarativeContainer classes have a graph to check; any other class just holds the provider."""

    class Holder:
        thing = RequestScoped(Session)

    with request_scope():
        assert Holder.thing() is Holder.thing()
