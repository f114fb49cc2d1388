"""No SSH, subprocess or sleeping inside a web request: probes and detection go to a worker.

The guard replaces subprocess, paramiko's connect, NVML and time.sleep in this test process
only, with a BaseException that no `except Exception` in a service can swallow, and the views
are called through the test client, their on-commit callbacks (the task sends) included. No
worker runs here, so a view that waited for one would show in the timings.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import paramiko
import pynvml
import pytest

from clusters.models import Host


class IOInRequest(BaseException):
    """Raised by the guard: a request reached for a process, a host or the clock."""


@pytest.fixture
def no_io(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []

    def refuse(what: str) -> Any:
        def guard(*args: Any, **kwargs: Any) -> Any:
            calls.append(what)
            raise IOInRequest(what)

        return guard

    monkeypatch.setattr(subprocess, "run", refuse("subprocess.run"))
    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
    monkeypatch.setattr(paramiko.SSHClient, "connect", refuse("paramiko.SSHClient.connect"))
    monkeypatch.setattr(paramiko.Transport, "start_client", refuse("paramiko.Transport"))
    monkeypatch.setattr(pynvml, "nvmlInit", refuse("pynvml.nvmlInit"))
    monkeypatch.setattr(time, "sleep", refuse("time.sleep"))
    yield calls
    assert calls == [], f"a request did I/O it must leave to a worker: {calls}"


@pytest.fixture
def unreachable_port() -> int:
    """A port on 127.0.0.1 where nothing listens: a host there never answers a probe."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(django_capture_on_commit_callbacks: Any, call: Any) -> tuple[Any, float]:
    """The response and how long the request took, its on-commit sends included."""
    started = time.monotonic()
    with django_capture_on_commit_callbacks(execute=True):
        response = call()
    return response, time.monotonic() - started


def test_registering_a_host_answers_202_at_once_and_probes_in_a_worker(
    admin, no_io, unreachable_port, django_capture_on_commit_callbacks
):
    """GIVEN a host whose address never answers and no worker running WHEN an admin registers
    it THEN 202 within 0.5 s with the host as the database knows it (unknown, never probed)
    and where to poll; nothing was probed in the request (on a7cc089: it waited 10 s)."""
    body = {"name": "far", "hostname": "127.0.0.1", "port": unreachable_port, "username": "x"}
    response, elapsed = timed(
        django_capture_on_commit_callbacks,
        lambda: admin.client.post("/api/hosts", body, format="json"),
    )
    assert response.status_code == 202, response.content
    assert elapsed < 0.5, elapsed
    host = response.json()
    assert host["name"] == "far" and host["state"] == "unknown"
    assert host["probed_at"] is None and host["inventory_at"] is None
    assert host["probe"]["status"] == "requested" and host["probe"]["requested_at"]
    assert host["probe"]["poll"] == "/api/hosts/far"
    assert admin.client.get(host["probe"]["poll"]).json()["probed_at"] is None
    assert Host.objects.filter(name="far").exists()


@pytest.mark.django_db(transaction=True)
def test_registration_does_not_wait_for_a_worker_that_is_not_there(admin, unreachable_port):
    """The same without the guard, committed for real (the send happens in the request): no
    worker answers, and the request still returns within 0.5 s (a7cc089 polled for 10 s)."""
    body = {"name": "far", "hostname": "127.0.0.1", "port": unreachable_port, "username": "x"}
    started = time.monotonic()
    response = admin.client.post("/api/hosts", body, format="json")
    elapsed = time.monotonic() - started
    assert elapsed < 0.5, elapsed
    assert response.status_code == 202, response.content


def test_a_probe_answers_202_at_once(
    member, no_io, unreachable_port, django_capture_on_commit_callbacks
):
    Host.objects.create(name="far", hostname="127.0.0.1", port=unreachable_port, state="online")
    response, elapsed = timed(
        django_capture_on_commit_callbacks, lambda: member.client.post("/api/hosts/far/probe")
    )
    assert response.status_code == 202, response.content
    assert elapsed < 0.5, elapsed
    # The current view: still what the last probe said, until a worker says otherwise.
    assert response.json()["state"] == "online" and response.json()["probe"]["requested_at"]


def test_accepting_a_key_answers_202_and_leaves_the_probe_to_a_worker(
    admin, no_io, unreachable_port, django_capture_on_commit_callbacks
):
    new = "SHA256:" + "B" * 43
    Host.objects.create(
        name="far",
        hostname="127.0.0.1",
        port=unreachable_port,
        state="key_mismatch",
        host_key_fingerprint="SHA256:" + "A" * 43,
        facts={"presented_fingerprint": new},
    )
    response, elapsed = timed(
        django_capture_on_commit_callbacks,
        lambda: admin.client.post("/api/hosts/far/accept-key", {"fingerprint": new}, format="json"),
    )
    assert response.status_code == 202, response.content
    assert elapsed < 0.5, elapsed
    assert response.json()["host_key_fingerprint"] == new and response.json()["state"] == "unknown"


def test_detect_answers_202_with_the_current_cluster_and_runs_nothing(
    member, no_io, django_capture_on_commit_callbacks
):
    """GIVEN no worker WHEN an agent asks to detect the cluster THEN 202 within 0.5 s with the
    cluster as the database knows it (the keys agents read), each host's inventory age, and
    when the detect was asked; nvidia-smi, NVML and sinfo were not run in the request."""
    response, elapsed = timed(
        django_capture_on_commit_callbacks, lambda: member.client.post("/api/cluster/detect")
    )
    assert response.status_code == 202, response.content
    assert elapsed < 0.5, elapsed
    state = response.json()
    assert state["type"] in {"local_gpu", "slurm", "cpu_only"} and "gpu_count" in state
    assert state["detect"]["status"] == "requested" and state["detect"]["requested_at"]
    [local] = [h for h in state["hosts"] if h["name"] == "local"]
    assert local["gpus"] == [] and local["inventory_age_seconds"] is None  # never read yet


def test_the_cluster_says_how_old_each_inventory_is(member):
    from datetime import timedelta

    from django.utils import timezone

    Host.objects.create(
        name="box", hostname="10.0.0.9", inventory_at=timezone.now() - timedelta(seconds=90)
    )
    [row] = [h for h in member.client.get("/api/cluster").json()["hosts"] if h["name"] == "box"]
    assert 90 <= row["inventory_age_seconds"] < 100
