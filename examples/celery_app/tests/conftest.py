"""The worker test's Redis fixture, shared with the library's own Celery tests."""

from tests.test_celery import redis_url

__all__ = ["redis_url"]
