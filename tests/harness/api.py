"""Small helpers tests use to drive Labsite through its API, as a user or an agent would."""

from __future__ import annotations

from typing import Any

from django.utils.dateparse import parse_datetime

from experiments.models import Run
from tests.harness.worker import wait_for

TERMINAL = {"finished", "failed", "stopped"}


def register(admin: Any, host: Any, **extra: Any) -> dict:
    """POST /api/hosts for a namespace test host, as an admin; returns the host JSON once a
    worker has probed it (the request only asks for the probe: it answers 202 at once)."""
    body = {
        "name": host.name,
        "kind": "ssh",
        "hostname": host.ip,
        "port": host.port,
        "username": host.username,
        "identity_file": str(host.key_path),
        # Every namespace host shares this machine's few cores (its inventory reads them):
        # an admin's override, so that a test's 4 fake GPUs per host can all be busy at once.
        "cpu_slots": 16,
        **extra,
    }
    response = admin.client.post("/api/hosts", body, format="json")
    assert response.status_code == 202, response.content
    asked = response.json()
    assert asked["probe"]["status"] == "requested", asked
    return wait_probed(admin.client, host.name, after=asked["probe"]["requested_at"])


def wait_probed(client: Any, name: str, after: str | None = None, timeout: float = 30) -> dict:
    """GET /api/hosts/{name} until a worker has probed it (probed_at set, and later than
    `after`, the probe's requested_at, when given); returns the host JSON."""

    def probed() -> dict | None:
        response = client.get(f"/api/hosts/{name}")
        assert response.status_code == 200, response.content
        host = response.json()
        stamp = host["probed_at"]
        if stamp and (after is None or parse_datetime(stamp) >= parse_datetime(after)):
            return dict(host)
        return None

    return wait_for(probed, timeout=timeout, what=f"a probe of host {name}")


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
