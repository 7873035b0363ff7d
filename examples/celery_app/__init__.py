"""Stock reservations processed by Celery: dependency-injector, one session per task, SQLAlchemy.

    python -m examples.celery_app.cli setup                  # tables and two items, in inventory.sqlite3
    celery -A examples.celery_app.worker worker --loglevel=info
    python -m examples.celery_app.cli reserve order-1 apple 3
    python -m examples.celery_app.cli stock

The broker and result backend are Redis (``INVENTORY_REDIS_URL``, default
``redis://127.0.0.1:6379/0``); the database is ``INVENTORY_DATABASE_URL``.
"""
