"""The integration tier: real PostgreSQL, Redis and a Celery worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest
import redis
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _require_postgres(request: pytest.FixtureRequest) -> None:
    if "db" in request.fixturenames or "transactional_db" in request.fixturenames:
        assert connection.vendor == "postgresql", (
            "the integration tier runs on PostgreSQL: use `make test` or set DATABASE_URL"
        )


def redis_test_client() -> redis.Redis:
    db = int(urlparse(settings.REDIS_URL).path.lstrip("/") or 0)
    assert db != 0, "tests flush their Redis database: point REDIS_URL at a db other than 0"
    return redis.Redis.from_url(settings.REDIS_URL)


def database_url_for_children() -> str:
    """A URL for the test database pytest-django created, for processes we start."""
    s = connection.settings_dict
    auth = quote(s["USER"] or "")
    if s.get("PASSWORD"):
        auth += ":" + quote(s["PASSWORD"])
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url_for_children(),
        REDIS_URL=settings.REDIS_URL,
        LABSITE_DATA_DIR=str(settings.DATA_DIR),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Stop what we started, by its pid (never by name)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# Short timers so tests see polls and passes quickly (the defaults are for a lab).
FAST_TIMERS = {
    "LABSITE_POLL_INTERVAL_SECONDS": "0.5",
    "LABSITE_SCHEDULE_INTERVAL_SECONDS": "1",
    "LABSITE_RECONCILE_INTERVAL_SECONDS": "5",
    "LABSITE_STOP_GRACE_SECONDS": "2",
}


@pytest.fixture
def celery_worker(transactional_db: None, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real `celery worker` process on the test database and the test Redis db."""
    redis_test_client().flushdb()
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "labsite", "worker", "--loglevel=INFO",
         "--concurrency=4", "--without-gossip", "--without-mingle", "-B",
         "--schedule", str(tmp_path / "beat-schedule"), "-n", f"test-{os.getpid()}@%h"],
        cwd=ROOT, env=child_env(**FAST_TIMERS), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    from labsite.celery import app

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        if app.control.ping(timeout=0.5):
            break
    else:
        stop_process_group(proc)
        pytest.fail("the Celery worker did not answer a ping within 60 s")
    yield proc
    stop_process_group(proc)
    log.close()
