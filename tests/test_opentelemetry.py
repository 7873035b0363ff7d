"""OpenTelemetryObserver: the scope's story on the request span, checked with the SDK's in-memory exporter."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from dependency_injector import containers
from dependency_injector.wiring import inject
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from di_request_scope import RequestScoped, RequestScopeMiddleware, observe, request_scope
from di_request_scope.fastapi import Provide
from di_request_scope.opentelemetry import OpenTelemetryObserver


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FlushError(Exception):
    pass


class Resource:
    """A context manager whose teardown raises when told to, like a session whose commit fails."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fail = False

    def __enter__(self) -> Resource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.fail:
            raise FlushError(f"{self.name} could not flush")


class Container(containers.DeclarativeContainer):
    session = RequestScoped(Resource, "session")
    outbox = RequestScoped(Resource, "outbox")


router = APIRouter()


@router.get("/notes/{status}")
@inject
async def notes(
    status: int,
    session: Resource = Depends(Provide[Container.session]),
    outbox: Resource = Depends(Provide[Container.outbox]),
) -> str:
    assert (session.name, outbox.name) == ("session", "outbox")
    if status != 200:
        raise HTTPException(status)
    return "ok"


@router.get("/fails-late")
@inject
async def fails_late(tasks: BackgroundTasks, outbox: Resource = Depends(Provide[Container.outbox])) -> str:
    outbox.fail = True  # its teardown raises, after the response was sent
    tasks.add_task(lambda: None)
    return "sent"


def create_app() -> FastAPI:
    app = FastAPI()
    app.include_router(router)
    return app


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with observe(OpenTelemetryObserver(tracer_provider=provider)):
        yield provider, exporter
    provider.shutdown()


@pytest.fixture(autouse=True)
def wired() -> Iterator[None]:
    container = Container()
    container.wire(modules=[__name__])
    yield
    container.unwire()


# --8<-- [start:instrumented]
def instrumented(provider: TracerProvider) -> Any:
    app = create_app()
    app.add_middleware(RequestScopeMiddleware)
    # The instrumentation goes outside, so the request span is current when the scope opens.
    return OpenTelemetryMiddleware(app, tracer_provider=provider)


# --8<-- [end:instrumented]


async def get(asgi_app: Any, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.get(path)


def server_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    return span


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def steps(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("teardown ")]


def scope_attributes(span: ReadableSpan) -> dict[str, Any]:
    return {k: v for k, v in (span.attributes or {}).items() if k.startswith("di_request_scope.")}


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


@pytest.mark.anyio
async def test_the_request_span_tells_which_instances_the_request_created(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """Counted and named as they are created, with one event each, while the request span records."""
    provider, exporter = spans
    assert (await get(instrumented(provider), "/notes/200")).status_code == 200
    span = server_span(exporter)
    assert scope_attributes(span) == {
        "di_request_scope.instances": 2,
        "di_request_scope.providers": ("Container.session", "Container.outbox"),
    }
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("di_request_scope.instance_created", {"di_request_scope.provider": "Container.session"}),
        ("di_request_scope.instance_created", {"di_request_scope.provider": "Container.outbox"}),
    ]


@pytest.mark.anyio
async def test_teardown_after_the_response_is_a_child_of_the_request_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """The request span ended with the response; the teardown span hangs under it, with the outcome,
    and holds one span per step, in reverse creation order and within its own time."""
    provider, exporter = spans
    await get(instrumented(provider), "/notes/200")
    request = server_span(exporter)
    (teardown,) = named(exporter, "di_request_scope teardown")
    assert parent_of(teardown) == request.context.span_id
    assert teardown.start_time >= request.end_time  # type: ignore[operator]
    assert scope_attributes(teardown) == {
        "di_request_scope.outcome": "success",
        "di_request_scope.instances": 2,
        "di_request_scope.teardown_errors": 0,
    }
    assert teardown.status.status_code == StatusCode.UNSET
    assert [s.name for s in steps(exporter)] == ["teardown Container.outbox", "teardown Container.session"]
    for step in steps(exporter):
        assert parent_of(step) == teardown.context.span_id
        assert teardown.start_time <= step.start_time <= step.end_time <= teardown.end_time  # type: ignore[operator]
        assert step.attributes == {"di_request_scope.provider": step.name.removeprefix("teardown ")}


@pytest.mark.anyio
async def test_a_failed_request_marks_the_request_span_before_it_ends(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """An error status fails the scope before the response goes out: the request span says so, and why."""
    provider, exporter = spans
    assert (await get(instrumented(provider), "/notes/409")).status_code == 409
    failure = {
        "di_request_scope.outcome": "failure",
        "di_request_scope.failure": "RequestFailed",
        "di_request_scope.failure.reason": "the response status was 409",
    }
    assert scope_attributes(server_span(exporter)).items() >= failure.items()
    (teardown,) = named(exporter, "di_request_scope teardown")
    assert scope_attributes(teardown).items() >= failure.items()


@pytest.mark.anyio
async def test_a_teardown_error_after_the_response_marks_the_teardown_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """The client got its 200; the teardown span counts the error and errs, the step records the exception."""
    provider, exporter = spans
    assert (await get(instrumented(provider), "/fails-late")).text == '"sent"'
    (teardown,) = named(exporter, "di_request_scope teardown")
    assert scope_attributes(teardown)["di_request_scope.teardown_errors"] == 1
    assert teardown.status.status_code == StatusCode.ERROR
    (step,) = steps(exporter)
    assert step.status.status_code == StatusCode.ERROR
    assert step.status.description == "FlushError: outbox could not flush"
    (exception,) = step.events
    assert exception.attributes["exception.type"].endswith("FlushError")  # type: ignore[index]


@pytest.mark.anyio
async def test_a_job_span_gets_the_outcome_when_its_scope_closes(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """request_scope() outside HTTP writes on the span current around it, which is still open at teardown."""
    provider, exporter = spans
    with provider.get_tracer("jobs").start_as_current_span("import notes"):
        async with request_scope():
            await _use_session()
    (job,) = named(exporter, "import notes")
    assert scope_attributes(job) == {
        "di_request_scope.instances": 1,
        "di_request_scope.providers": ("Container.session",),
        "di_request_scope.outcome": "success",
        "di_request_scope.teardown_errors": 0,
    }


@inject
async def _use_session(session: Resource = Provide[Container.session]) -> None:
    assert session.name == "session"


@pytest.mark.anyio
async def test_a_nested_scope_leaves_the_outer_scope_attributes_alone(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """Scopes opened inside another on the same span add their events and teardown spans, not their counts."""
    provider, exporter = spans
    with provider.get_tracer("jobs").start_as_current_span("batch"):
        async with request_scope():
            Container.outbox()
            for _ in range(2):
                async with request_scope():
                    Container.session()
                    Container.outbox()
    (batch,) = named(exporter, "batch")
    assert scope_attributes(batch)["di_request_scope.providers"] == ("Container.outbox",)
    assert len([e for e in batch.events if e.name == "di_request_scope.instance_created"]) == 5
    assert len(named(exporter, "di_request_scope teardown")) == 3


@pytest.mark.anyio
async def test_with_the_scope_outside_the_instrumentation_the_first_instance_finds_the_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """The scope opens before the request span exists; the span current at the first creation is used."""
    provider, exporter = spans
    app = RequestScopeMiddleware(OpenTelemetryMiddleware(create_app(), tracer_provider=provider))
    assert (await get(app, "/notes/200")).status_code == 200
    request = server_span(exporter)
    assert scope_attributes(request)["di_request_scope.instances"] == 2
    (teardown,) = named(exporter, "di_request_scope teardown")
    assert parent_of(teardown) == request.context.span_id


class TeardownSpanEnded(SpanProcessor):
    """Tells when the teardown span ended: under a server, after the response reached the client."""

    def __init__(self) -> None:
        self.ended = threading.Event()

    def on_end(self, span: ReadableSpan) -> None:
        if span.name == "di_request_scope teardown":
            self.ended.set()


@pytest.mark.server
def test_a_real_server_records_the_teardown_under_the_request_span(
    spans: tuple[TracerProvider, InMemorySpanExporter], uvicorn_server: Any
) -> None:
    """Under uvicorn, teardown after the response and its background task still reports its error."""
    provider, exporter = spans
    teardown_ended = TeardownSpanEnded()
    provider.add_span_processor(teardown_ended)
    with uvicorn_server(instrumented(provider)) as server:
        assert httpx.get(f"{server.url}/fails-late").text == '"sent"'
        assert teardown_ended.ended.wait(10)
    (teardown,) = named(exporter, "di_request_scope teardown")
    assert parent_of(teardown) == server_span(exporter).context.span_id
    assert scope_attributes(teardown)["di_request_scope.teardown_errors"] == 1
