"""Every queued run says why it waits, from the moment it is queued (issue 10, bug 5).

A run that no enabled host could ever take says so at creation (one query per request); any
other queued run waits "for the scheduler's next pass" until a pass gives its real reason.
The run page and the runs list show the reason.
"""

from __future__ import annotations

import html

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from clusters.models import Host
from clusters.services import host_ensure_local
from experiments import scheduler, services
from experiments.actors import Actor
from experiments.capacity import PENDING_PASS
from experiments.models import Run
from tests.factories import GpuFactory

NO_GPU_HOST = "needs 1 GPU(s); no GPU host is enabled"


def create(person, **body):
    response = person.client.post(
        "/api/runs", {"command": "python train.py", "auto_start": True, **body}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


@pytest.fixture
def four_gpus(db):
    host = Host.objects.create(
        name="node-a", kind="ssh", hostname="10.0.0.1", state="online", gpu_source="nvidia-smi"
    )
    return [GpuFactory(host=host, index=i) for i in range(4)]  # 80 GB each


def test_a_gpu_run_in_a_lab_without_gpu_hosts_says_so_at_once(member):
    """GIVEN a lab whose only host is the local one, without GPUs WHEN a member creates a
    1-GPU run THEN it is queued (hosts may be added later), and the answer already says that
    no GPU host is enabled: no pass has run yet."""
    host_ensure_local()
    body = create(member, gpus=1)
    assert (body["status"], body["waiting_reason"]) == ("queued", NO_GPU_HOST)
    detail = member.client.get(f"/api/runs/{body['id']}").json()
    assert detail["waiting_reason"] == NO_GPU_HOST


def test_a_run_larger_than_any_host_says_so(member, four_gpus):
    body = create(member, gpus=8)
    assert (body["status"], body["waiting_reason"]) == (
        "queued",
        "needs 8 GPU(s); the largest host has 4",
    )
    mem = create(member, gpus=1, min_free_mem_mb=90000)  # 1.2 x 90000 MB: more than 80 GB
    assert mem["waiting_reason"] == (
        "needs 1 GPU(s) with 90000 MB free; the largest host has 0 of 108000 MB or more"
    )


def test_a_cpu_run_without_any_enabled_host_says_so(member):
    Host.objects.filter(pk=host_ensure_local().pk).update(enabled=False)
    body = create(member, gpus=0)
    assert (body["status"], body["waiting_reason"]) == ("queued", "no enabled host")


def test_a_run_that_fits_in_time_waits_for_the_next_pass_then_gets_its_reason(member, four_gpus):
    """GIVEN a run that a host could take WHEN it is created THEN it waits for the next pass
    (it says so); WHEN a pass cannot place it (every GPU busy) THEN the pass's reason replaces
    that one, in the scheduler's words."""
    for gpu in four_gpus:
        gpu.memory_used_mb = 40000  # someone else's work: not free by policy
        gpu.save()
    body = create(member, gpus=2)
    assert body["waiting_reason"] == PENDING_PASS
    scheduler.schedule_pass()
    run = Run.objects.get(pk=body["id"])
    assert (run.status, run.waiting_reason) == ("queued", "needs 2 GPU(s); 0 free on node-a")


def test_every_way_into_the_queue_gives_a_reason(member, pi, four_gpus):
    """A run started later, a run released by its plan's approval, and a run created queued
    directly all say why they wait."""
    actor = Actor(kind="user", user=member.user)
    ready = services.run_create(actor=actor, command="a", gpus=8)
    assert ready.status == "ready" and ready.waiting_reason == ""
    started = services.run_start(run=ready, actor=actor)
    assert started.waiting_reason == "needs 8 GPU(s); the largest host has 4"

    plan = services.plan_submit(plan=services.plan_create(actor=actor, title="t"), actor=actor)
    held = services.run_create(actor=actor, command="b", gpus=1, plan=plan, auto_start=True)
    assert (held.status, held.waiting_reason) == ("held", "")
    services.plan_approve(plan=plan, actor=Actor(kind="user", user=pi.user))
    held.refresh_from_db()
    assert (held.status, held.waiting_reason) == ("queued", PENDING_PASS)


def test_a_grid_gives_each_run_the_reason_with_one_query(member):
    """GIVEN no GPU host WHEN grids of 5 and of 50 GPU runs are created THEN every run has the
    reason, and the check costs the same for both (once per request, not per run)."""
    host_ensure_local()
    member.client.get("/api/runs")  # the token's first-use write, once
    counts = {}
    for n in (5, 50):
        with CaptureQueriesContext(connection) as ctx:
            response = member.client.post(
                "/api/sweeps",
                {
                    "name": f"g{n}",
                    "base_command": "python train.py",
                    "parameters": {"lr": list(range(n))},
                    "auto_start": True,
                    "gpus": 1,
                },
                format="json",
            )
        assert response.status_code == 201, response.content
        counts[n] = [q["sql"] for q in ctx.captured_queries if "clusters_gpu" in q["sql"]]
        sweep_runs = Run.objects.filter(sweep_id=response.json()["id"])
        assert set(sweep_runs.values_list("status", "waiting_reason")) == {("queued", NO_GPU_HOST)}
        assert sweep_runs.count() == n
    assert len(counts[5]) == len(counts[50]) == 1, counts


def test_the_run_page_and_the_runs_list_show_the_reason(client, member):
    host_ensure_local()
    run_id = create(member, gpus=1, name="needs-a-gpu")["id"]
    client.force_login(member.user)
    page = html.unescape(client.get(f"/runs/{run_id}").content.decode())
    assert NO_GPU_HOST in page
    listing = html.unescape(client.get("/").content.decode())
    assert "needs-a-gpu" in listing and NO_GPU_HOST in listing
