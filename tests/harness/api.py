"""Small helpers tests use to drive Labsite through its API, as a user or an agent would."""

from __future__ import annotations

from typing import Any

from experiments.models import Run
from tests.harness.worker import wait_for

TERMINAL = {"finished", "failed", "stopped"}


def register(admin: Any, host: Any, **extra: Any) -> dict:
    """POST /api/hosts for a namespace test host, as an admin; returns the host JSON."""
    body = {
        "name": host.name,
        "kind": "ssh",
        "hostname": host.ip,
        "port": host.port,
        "username": host.username,
        "identity_file": str(host.key_path),
        **extra,
    }
    response = admin.client.post("/api/hosts", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def create(client: Any, host: Any = None, **body: Any) -> str:
    """POST /api/runs (auto_start); without `host` the scheduler picks one. Returns the id."""
    if host is not None:
        body["host"] = host.name
    response = client.post("/api/runs", {"auto_start": True, **body}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def ended(run_id: str, timeout: float = 60) -> Run:
    """The run once it is finished, failed or stopped."""
    return wait_for(
        lambda: (r := Run.objects.get(pk=run_id)).status in TERMINAL and r, timeout=timeout
    )
