"""The inventory tasks: eagerly on SQLite and PostgreSQL, and in a real prefork worker on Redis.

Run: `.venv/bin/pytest examples/celery_app -q`. The worker test starts
`celery -A examples.celery_app.worker worker` as a subprocess, on a queue of its
own; it is skipped when no Redis server answers on 127.0.0.1:6379 (and fails
instead when DI_REQUEST_SCOPE_REQUIRE_REDIS=1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from examples.celery_app.models import Base, Item, Reservation
from examples.celery_app.services import OutOfStockError
from examples.celery_app.worker import app, container, reserve, restock
from tests.test_celery import close_connections

ROOT = Path(__file__).resolve().parents[3]


def stock_and_orders(database_url: str) -> tuple[dict[str, int], list[str]]:
    """What was committed, read through a connection of our own."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            stock = {item.sku: item.stock for item in session.scalars(select(Item))}
            orders = sorted(session.scalars(select(Reservation.order_ref)))
            return stock, orders
    finally:
        engine.dispose()


def stocked(database_url: str) -> str:
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            session.add_all([Item(sku="apple", stock=10), Item(sku="pear", stock=2)])
    finally:
        engine.dispose()
    return database_url


# --------------------------------------------------------------------------- eager mode


# --8<-- [start:eager]
@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'inventory.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_schema_url")
    container.config.database_url.from_value(stocked(url))
    try:
        yield url
    finally:
        container.shutdown_resources()  # engine.dispose()
        container.reset_singletons()  # the next test's sessionmaker binds its own engine


@pytest.fixture
def eager() -> Iterator[None]:
    """task_always_eager: `.delay()` runs the task right here, still in a scope of its own."""
    app.conf.update(task_always_eager=True, task_store_eager_result=False)
    try:
        yield
    finally:
        app.conf.update(task_always_eager=False)


def test_reserve_takes_the_stock_and_records_the_order(eager: None, database_url: str) -> None:
    result = reserve.delay("order-1", "apple", 3)
    assert result.successful()
    assert stock_and_orders(database_url) == ({"apple": 7, "pear": 2}, ["order-1"])


def test_a_refused_reservation_leaves_nothing_behind(eager: None, database_url: str) -> None:
    result = reserve.delay("order-2", "pear", 5)
    assert result.failed()
    assert isinstance(result.result, OutOfStockError)
    # The reservation row was written before the stock check failed: rolled back.
    assert stock_and_orders(database_url) == ({"apple": 10, "pear": 2}, [])


# --8<-- [end:eager]


def test_an_order_reserved_twice_fails_the_second_task(eager: None, database_url: str) -> None:
    assert reserve.delay("order-3", "apple", 1).successful()
    assert reserve.delay("order-3", "apple", 1).failed()
    assert stock_and_orders(database_url) == ({"apple": 9, "pear": 2}, ["order-3"])


def test_restock_commits(eager: None, database_url: str) -> None:
    assert restock.delay("pear", 4).get() == 6
    assert stock_and_orders(database_url)[0]["pear"] == 6


# --------------------------------------------------------------------------- a real worker


class Worker:
    """`celery worker` in a subprocess, prefork pool with one child, on a queue of its own."""

    def __init__(self, redis_url: str, database_url: str, log: Path) -> None:
        self.queue = f"di-request-scope-example-{uuid.uuid4().hex[:12]}"
        self.redis_url = redis_url
        self.database_url = database_url
        self.log = log
        env = {
            **os.environ,
            "INVENTORY_REDIS_URL": redis_url,
            "INVENTORY_QUEUE": self.queue,
            "INVENTORY_DATABASE_URL": database_url,
            "PYTHONPATH": str(ROOT),
        }
        command = [
            sys.executable, "-m", "celery", "-A", "examples.celery_app.worker", "worker",
            "--pool=prefork", "--concurrency=1", "--loglevel=info",
            "--without-mingle", "--without-gossip", "--without-heartbeat",
            f"--hostname={self.queue}@%h",
        ]  # fmt: skip
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, result: AsyncResult[object]) -> object:
        """The task's outcome; fails at once, with the worker's log, if the worker died."""
        for _ in range(60):  # a bound on a hang (60 s), not a timing assertion
            try:
                return result.get(timeout=1, propagate=False)
            except CeleryTimeoutError:
                if self.process.poll() is not None:
                    pytest.fail(f"the worker exited ({self.process.returncode}):\n{self.log.read_text()}")
        pytest.fail(f"no result after 60 s:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)  # warm shutdown: finish the task, then exit
        try:
            return self.process.wait(timeout=60)
        finally:
            with redis.Redis.from_url(self.redis_url) as client:
                client.delete(self.queue, f"_kombu.binding.{self.queue}")


@pytest.fixture
def worker(redis_url: str, tmp_path: Path) -> Iterator[Worker]:
    """The worker, and this process's app sending to its queue; `redis_url` skips the test without Redis."""
    database_url = stocked(f"sqlite:///{tmp_path / 'inventory.sqlite3'}")
    worker = Worker(app.conf.broker_url, database_url, tmp_path / "worker.log")
    default_queue = app.conf.task_default_queue
    app.conf.update(task_default_queue=worker.queue)
    try:
        yield worker
    finally:
        app.conf.update(task_default_queue=default_queue)
        if worker.process.poll() is None:
            worker.stop()
        close_connections(app)


@pytest.mark.server
def test_prefork_worker_commits_each_task_alone_and_leaves_nothing_open(worker: Worker) -> None:
    """A refused order between two good ones changes nothing, and holds no lock the next task would hit."""
    first = reserve.delay("order-1", "apple", 3)
    assert worker.wait(first) == 1
    refused = reserve.delay("order-2", "pear", 5)
    assert isinstance(worker.wait(refused), OutOfStockError)
    assert refused.state == "FAILURE"
    last = reserve.delay("order-3", "pear", 2)
    assert worker.wait(last) == 2  # the refused order's id was rolled back and is reused
    assert stock_and_orders(worker.database_url) == ({"apple": 7, "pear": 0}, ["order-1", "order-3"])
    assert worker.stop() == 0
