"""Shared fixtures: the four people every endpoint is checked against, and API clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from rest_framework.test import APIClient

from labsite.models import ApiToken
from labsite.roles import assign_role
from tests.factories import UserFactory


@dataclass
class Person:
    user: Any
    token: str
    client: APIClient


def _person(username: str, role: str | None) -> Person:
    user = UserFactory(username=username)
    if role:
        assign_role(user, role)
    _, raw = ApiToken.issue(user)
    client = APIClient()
    client.credentials(HTTP_X_AUTH_TOKEN=raw)
    return Person(user=user, token=raw, client=client)


@pytest.fixture(autouse=True)
def _require_postgres(request: pytest.FixtureRequest) -> None:
    """The tiers that talk to real services run on PostgreSQL, never silently on SQLite."""
    needs_pg = request.node.get_closest_marker("integration") or request.node.get_closest_marker(
        "ssh"
    )
    if needs_pg and {"db", "transactional_db"} & set(request.fixturenames):
        from django.db import connection

        assert connection.vendor == "postgresql", (
            "this tier runs on PostgreSQL: use `make test` or set DATABASE_URL"
        )


@pytest.fixture(autouse=True)
def _local_members_trusted(settings: Any) -> None:
    """The machines the tests run on have a Redis without a password and a PostgreSQL that
    trusts local connections (TESTING.md), so the run user could reach both and the local
    host would take admins' runs only: the tests trust members there, as a lab may
    (LABSITE_LOCAL_TRUST_MEMBERS), and the workers they start inherit that (child_env).
    tests/integration/test_run_user_reach.py checks the refusal with the trust off."""
    settings.LABSITE = {**settings.LABSITE, "LOCAL_TRUST_MEMBERS": True}


@pytest.fixture(autouse=True)
def _health_read_fresh(settings: Any) -> None:
    """A test that changes runs and then reads system-health must see the change: the web
    process's one-second reuse of that answer is off (tests/unit/test_api_rows.py checks it)."""
    settings.LABSITE = {**settings.LABSITE, "HEALTH_CACHE_SECONDS": 0}


@pytest.fixture
def celery_worker(transactional_db: None, tmp_path: Any) -> Any:
    """A real `celery worker -B` process on the test database and the test Redis db."""
    from tests.harness.worker import Worker, redis_test_client

    redis_test_client().flushdb()
    worker = Worker(tmp_path).start()
    yield worker
    worker.stop()


@pytest.fixture(autouse=True)
def _no_auth_failures_carried_over(settings: Any) -> None:
    """Every test client comes from 127.0.0.1: one test's failed sign-ins must not throttle
    the next. Only the throttle's own keys are deleted (the db is the tests' Redis db)."""
    from labsite import throttle

    try:
        client = throttle._client(settings.REDIS_URL)
        keys = list(client.scan_iter(match=throttle.PREFIX + "*", count=1000))
        if keys:
            client.delete(*keys)
    except Exception:  # noqa: BLE001, S110 - no Redis: nothing was counted either
        pass


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    # PBKDF2 costs ~0.5 s per user on these machines; tests do not need a slow hash.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def member(db: None) -> Person:
    return _person("alice", "member")


@pytest.fixture
def other(db: None) -> Person:
    return _person("bob", "member")


@pytest.fixture
def pi(db: None) -> Person:
    return _person("carol", "pi")


@pytest.fixture
def admin(db: None) -> Person:
    return _person("dave", "admin")


@pytest.fixture
def anon(db: None) -> APIClient:
    return APIClient()


# --- tiers: gpu runs only where a GPU exists; any other skip fails the run ----------------


def _gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return bool(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library, no GPU: all mean "no GPU"
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("gpu") for item in items) and not _gpu_present():
        skip = pytest.mark.skip(reason="gpu tier: no NVIDIA GPU on this machine (NVML unavailable)")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


_forbidden_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "gpu" not in report.keywords:
        _forbidden_skips.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _forbidden_skips and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _forbidden_skips:
        terminalreporter.write_line(
            f"FAILED: {len(_forbidden_skips)} test(s) skipped outside the gpu tier; "
            "every other tier must run:",
            red=True,
        )
        for nodeid in _forbidden_skips[:20]:
            terminalreporter.write_line(f"  {nodeid}", red=True)
