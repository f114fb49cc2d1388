"""/api/health: what load balancers and compose health checks call, without credentials.

These talk to the real Redis of the test run (REDIS_URL) and to real sockets that refuse or
never answer: a mock would say nothing about timeouts.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.factories import RunFactory


@pytest.fixture
def closed_port() -> int:
    """A local port where nothing listens (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never says a word: a Redis
    that hangs, the case a health check must not hang on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def test_anonymous_callers_get_ok_and_nothing_else(anon, member):
    """GIVEN a lab with a run WHEN an anonymous client asks for health THEN 200 with exactly
    the three parts, none of the lab's data (on a7cc089: 401)."""
    RunFactory(created_by=member.user, command="python secret_train.py")
    response = anon.get("/api/health")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_a_wrong_token_does_not_turn_health_into_a_401(anon):
    anon.credentials(HTTP_X_AUTH_TOKEN="not-a-token")
    response = anon.get("/api/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_a_broker_that_refuses_is_a_503_at_once(anon, settings, closed_port):
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port}/0"
    started = time.monotonic()
    response = anon.get("/api/health")
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.content
    assert response.json() == {"status": "down", "database": "ok", "broker": "down"}
    assert elapsed < 2, elapsed


def test_a_broker_that_never_answers_is_a_503_within_2_s(anon, settings, silent_port):
    """GIVEN a "Redis" that accepts the connection and then says nothing WHEN health is asked
    THEN it gives up after its short timeout: 503, well within 2 s (redis-py's default is 5 s
    per try, with retries)."""
    settings.REDIS_URL = f"redis://127.0.0.1:{silent_port}/0"
    started = time.monotonic()
    response = anon.get("/api/health")
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.content
    assert response.json()["broker"] == "down" and response.json()["status"] == "down"
    assert elapsed < 2, elapsed


@pytest.mark.parametrize("path", ["/api/runs", "/api/cluster", "/api/hosts", "/api/alerts"])
def test_nothing_else_opens_up(anon, path):
    response = anon.get(path)
    assert response.status_code == 401 and "detail" in response.json()


def test_the_schema_documents_health_as_200_or_503_only(anon):
    responses = anon.get("/api/openapi.json").json()["paths"]["/api/health"]["get"]["responses"]
    assert set(responses) == {"200", "503"}
