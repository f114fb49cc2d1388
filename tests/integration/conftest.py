"""The integration tier: real PostgreSQL, Redis and a Celery worker process."""

from __future__ import annotations

import pytest

from tests.harness.worker import ROOT, redis_test_client  # noqa: F401 - used by the tests


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
