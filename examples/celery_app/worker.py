"""The Celery app and its tasks: ``celery -A examples.celery_app.worker worker``.

``task_cls=ScopedTask`` runs every task in a request scope of its own, so the
service and both repositories share one Session per execution, committed
before Celery records the result.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals
from dependency_injector.wiring import Provide, inject
from sqlalchemy.exc import OperationalError

from di_request_scope.celery import ScopedTask

from .containers import Container
from .services import InventoryService

REDIS_URL = os.environ.get("INVENTORY_REDIS_URL", "redis://127.0.0.1:6379/0")

# --8<-- [start:app]
app = Celery("inventory", broker=REDIS_URL, backend=REDIS_URL, task_cls=ScopedTask)
app.conf.update(
    task_default_queue=os.environ.get("INVENTORY_QUEUE", "inventory"),
    broker_connection_retry_on_startup=True,
)

container = Container()
container.config.database_url.from_value(
    os.environ.get("INVENTORY_DATABASE_URL", "sqlite:///inventory.sqlite3")
)


@app.task(autoretry_for=(OperationalError,), retry_backoff=True, max_retries=5)
@inject
def reserve(
    order_ref: str, sku: str, quantity: int, service: InventoryService = Provide[Container.service]
) -> int:
    # A deadlock or serialization failure, in the body or in the commit, retries the task.
    return service.reserve(order_ref, sku, quantity)


@app.task
@inject
def restock(sku: str, quantity: int, service: InventoryService = Provide[Container.service]) -> int:
    return service.restock(sku, quantity)


container.wire(modules=[__name__])
# --8<-- [end:app]


# --8<-- [start:shutdown]
@signals.worker_process_shutdown.connect
def dispose_in_child(**_: Any) -> None:
    container.shutdown_resources()  # a prefork child exits: engine.dispose()


@signals.worker_shutdown.connect
def dispose_in_worker(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "app", None) is app:  # solo and threads pools run tasks here
        container.shutdown_resources()


# --8<-- [end:shutdown]
