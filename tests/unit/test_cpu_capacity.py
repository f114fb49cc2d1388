"""CPU runs respect a host's cores (issue 13): each host has CPU slots (its core count, read by
its inventory, or an admin's override), every run takes `cpus` of them (GPU runs too) and
optionally memory, and the scheduler never places more than a host has. `max_new_runs`,
/api/cluster and the board use the same figures; a run no host could ever fit says so when it
is created."""

from __future__ import annotations

import pytest

from clusters.executors import Executor, LocalTransport, protocol
from clusters.models import Host
from clusters.services import inventory_from_report, local_machine
from experiments import scheduler, services
from experiments.actors import Actor
from experiments.models import Run
from tests.factories import GpuFactory

pytestmark = pytest.mark.django_db


def host(name="node-a", **kw):
    return Host.objects.create(
        name=name, kind="ssh", hostname="10.0.0.1", state="online", host_key_fingerprint="x", **kw
    )


def queued(member, n=1, **kw):
    actor = Actor(kind="user", user=member.user)
    return [
        services.run_create(actor=actor, command="work", auto_start=True, kick=False, **kw)
        for _ in range(n)
    ]


def statuses(runs) -> list[str]:
    return [Run.objects.get(pk=r.pk).status for r in runs]


def test_a_host_takes_no_more_cpu_runs_than_its_slots(member):
    """GIVEN a 2-core host WHEN 5 one-CPU runs are queued THEN 2 are placed, 3 wait saying
    why; WHEN one ends THEN the next pass places one more, and only one."""
    node = host(cpu_count=2)
    runs = queued(member, 5, host=node)
    scheduler.schedule_pass(full=True)
    assert statuses(runs) == ["launching"] * 2 + ["queued"] * 3
    waiting = Run.objects.get(pk=runs[2].pk)
    assert waiting.waiting_reason == "needs 1 CPU(s); 0 of 2 CPU slots free on node-a"
    Run.objects.filter(pk=runs[0].pk).update(status="finished")
    scheduler.schedule_pass(full=False, gpu=False)
    assert statuses(runs) == ["finished", "launching", "launching", "queued", "queued"]


def test_runs_without_a_host_spread_over_hosts_with_room_and_cpus_count(member):
    """A run's `cpus` is what it takes; runs without a host go where there is room."""
    small, big = host("node-a", cpu_count=2), host("node-b", cpu_count=8)
    four = queued(member, 2, cpus=4)
    one = queued(member, 3)
    scheduler.schedule_pass(full=True)
    placed = {r.pk: (r.status, r.host.name if r.host else None) for r in Run.objects.all()}
    assert [placed[r.pk] for r in four] == [("launching", "node-b"), ("launching", "node-b")]
    assert [placed[r.pk] for r in one] == [("launching", "node-a")] * 2 + [("queued", None)]
    reason = Run.objects.get(pk=one[2].pk).waiting_reason
    assert reason == (
        "needs 1 CPU(s); 0 of 2 CPU slots free on node-a, 0 of 8 CPU slots free on node-b"
    )
    Host.objects.filter(pk=small.pk).update(cpu_slots=3)  # an admin's override
    scheduler.schedule_pass(full=True)
    assert Run.objects.get(pk=one[2].pk).host_id == small.pk
    assert big.cpu_slots is None


def test_gpu_runs_take_cpu_slots_too(member):
    """GIVEN 4 free GPUs on a 2-core host WHEN 4 one-GPU runs are queued THEN only 2 start:
    the others wait, and their reason says the CPU slots are what is missing."""
    node = host(cpu_count=2, gpu_source="nvidia-smi")
    for i in range(4):
        GpuFactory(host=node, index=i)
    runs = queued(member, 4, gpus=1)
    scheduler.schedule_pass(full=True)
    assert statuses(runs).count("launching") == 2
    reason = Run.objects.get(pk=runs[3].pk).waiting_reason
    assert reason.startswith("needs 1 GPU(s); 2 free on node-a")
    assert "0 of 2 CPU slots free on node-a" in reason


def test_memory_is_a_limit_too(member):
    node = host(cpu_count=8, memory_mb=1000)
    runs = queued(member, 2, memory_mb=800, host=node)
    scheduler.schedule_pass(full=True)
    assert statuses(runs) == ["launching", "queued"]
    assert "needs 1 CPU(s) and 800 MB" in Run.objects.get(pk=runs[1].pk).waiting_reason
    assert "(200 MB free)" in Run.objects.get(pk=runs[1].pk).waiting_reason


def test_a_run_no_host_could_ever_fit_says_so_when_it_is_created(member):
    host("node-a", cpu_count=2, memory_mb=1000)
    host("node-b", cpu_count=4, memory_mb=2000)
    body = {"command": "make -j", "auto_start": True}
    too_many = member.client.post("/api/runs", {**body, "cpus": 16}, format="json")
    assert too_many.status_code == 201, too_many.content
    assert too_many.json()["waiting_reason"] == (
        "needs 16 CPU(s); the largest host has 4 CPU slot(s)"
    )
    too_big = member.client.post("/api/runs", {**body, "memory_mb": 9000}, format="json")
    assert (
        too_big.json()["waiting_reason"]
        == "needs 1 CPU(s) and 9000 MB; the largest host has 2000 MB"
    )
    fits = member.client.post("/api/runs", {**body, "cpus": 4}, format="json")
    assert fits.json()["waiting_reason"] == "waiting for the scheduler's next pass"
    assert member.client.post("/api/runs", {**body, "cpus": 0}, format="json").status_code == 400


def test_capacity_figures_are_the_schedulers(member, admin):
    """Without GPUs, max_new_runs counts the hosts' CPU slots (no separate lab setting);
    /api/cluster shows each host's slots and what runs take of them."""
    host("node-a", cpu_count=2)
    host("node-b", cpu_count=8, cpu_slots=3)
    runs = queued(member, 2)
    scheduler.schedule_pass(full=True)
    assert statuses(runs) == ["launching", "launching"]
    cluster = member.client.get("/api/cluster").json()
    assert cluster["cpus"] == {"slots": 5, "free": 3}
    rows = {h["name"]: h for h in cluster["hosts"]}
    assert (rows["node-a"]["cpu_slots"], rows["node-a"]["cpus_used"]) == (2, 2)
    assert (rows["node-b"]["cpu_count"], rows["node-b"]["cpu_slots"]) == (8, 3)
    health = member.client.get("/api/wild/v2/system-health").json()
    assert (health["slots"], health["slot_kind"], health["max_new_runs"]) == (5, "cpu", 3)
    # An admin sets a host's slots; a member cannot.
    assert (
        member.client.patch("/api/hosts/node-b", {"cpu_slots": 4}, format="json").status_code == 403
    )
    changed = admin.client.patch("/api/hosts/node-b", {"cpu_slots": 4}, format="json")
    assert changed.status_code == 200 and changed.json()["cpu_slots"] == 4


def test_the_hosts_cores_and_memory_come_from_its_inventory(tmp_path):
    """poll.py reports the CPUs its user may run on and the machine's memory with the GPUs,
    and the inventory stores them (run for real here, on this machine, as this user)."""
    node = host()
    _, report = Executor(LocalTransport()).poll([], gpu=True)
    assert report is not None
    cpus, memory_mb = local_machine()
    assert report.cpus == cpus and abs(report.memory_mb - memory_mb) <= 1
    inventory_from_report(node, report)
    node.refresh_from_db()
    assert (node.cpu_count, node.cpu_slots_effective) == (cpus, cpus)
    assert node.memory_mb == report.memory_mb
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_gpu(
            {"gpu": {"query_gpu": "", "query_apps": "", "error": "", "pid_runs": {}, "cpus": -1}}
        )


def test_a_gpu_run_whose_cpus_no_gpu_host_has_says_so_when_it_is_created(member):
    """The GPUs are there, but not on a host with the CPU slots the run asks besides them."""
    node = host("gpu-a", cpu_count=4, gpu_source="nvidia-smi")
    for i in range(2):
        GpuFactory(host=node, index=i)
    host("cpu-big", cpu_count=64)
    body = {"command": "train", "auto_start": True, "gpus": 2}
    greedy = member.client.post("/api/runs", {**body, "cpus": 8}, format="json")
    assert greedy.status_code == 201, greedy.content
    assert greedy.json()["waiting_reason"] == (
        "needs 2 GPU(s) and 8 CPU(s); no host with 2 such GPU(s) has that many CPU slots"
    )
    fits = member.client.post("/api/runs", {**body, "cpus": 4}, format="json")
    assert fits.json()["waiting_reason"] == "waiting for the scheduler's next pass"
