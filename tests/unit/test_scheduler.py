"""The scheduler's policy on real rows: placement, reasons, caps, backfill, budgets, no_gpu."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from clusters.models import Host
from experiments import scheduler, services
from experiments.actors import Actor
from experiments.capacity import PENDING_PASS
from experiments.models import Alert, GpuLease, Run
from tests.factories import GpuFactory

WRAP = {"enabled": True, "retries": -1, "retry_delay_seconds": 30}


@pytest.fixture
def hosts(db):
    a = Host.objects.create(
        name="node-a", kind="ssh", hostname="10.0.0.1", state="online", gpu_source="nvidia-smi"
    )
    b = Host.objects.create(
        name="node-b", kind="ssh", hostname="10.0.0.2", state="online", gpu_source="nvidia-smi"
    )
    gpus = {
        "a": [GpuFactory(host=a, index=i) for i in range(4)],
        "b": [GpuFactory(host=b, index=i) for i in range(4)],
    }
    return a, b, gpus


def make(member, n=1, **kw):
    actor = Actor(kind="user", user=member.user)
    return [
        services.run_create(
            actor=actor,
            command="train",
            auto_start=True,
            kick=False,
            gpuwrap_config=kw.pop("wrap", WRAP),
            **kw,
        )
        for _ in range(n)
    ]


def leased_indices(run: Run) -> tuple[str, list[int]]:
    leases = GpuLease.objects.filter(run=run, released_at__isnull=True).select_related("gpu__host")
    hosts = {lease.gpu.host.name for lease in leases}
    assert len(hosts) <= 1
    return (hosts.pop() if hosts else ""), sorted(lease.gpu.index for lease in leases)


def test_busy_gpus_are_skipped_and_multi_gpu_runs_stay_on_one_host(hosts, member):
    a, b, gpus = hosts
    gpus["a"][1].processes = [{"pid": 4242, "used_memory_mb": 500, "run_id": None}]
    gpus["a"][1].save()
    gpus["b"][2].memory_used_mb = 30000
    gpus["b"][2].save()
    big = make(member, gpus=3)[0]
    small = make(member, n=3, gpus=1)
    scheduler.schedule_pass()
    host, indices = leased_indices(Run.objects.get(pk=big.pk))
    assert len(indices) == 3 and (host, indices) in [("node-a", [0, 2, 3]), ("node-b", [0, 1, 3])]
    taken = [(host, i) for i in indices]
    for r in small:
        h, idx = leased_indices(Run.objects.get(pk=r.pk))
        assert len(idx) == 1
        taken.append((h, idx[0]))
    assert ("node-a", 1) not in taken and ("node-b", 2) not in taken
    assert len(taken) == len(set(taken)) == 6


def test_a_run_that_cannot_fit_says_why(hosts, member):
    run = make(member, gpus=5)[0]
    scheduler.schedule_pass()
    run.refresh_from_db()
    assert run.status == "queued"
    assert run.waiting_reason == "needs 5 GPU(s); 4 free on node-a, 4 free on node-b"
    mem = make(member, gpus=1, min_free_mem_mb=70000)[0]  # 1.2 x 70000 > 81916 free
    scheduler.schedule_pass()
    mem.refresh_from_db()
    assert mem.status == "queued" and "with 70000 MB free; 0 free on node-a" in mem.waiting_reason


def test_the_per_user_cap_holds(hosts, member, other, settings):
    settings.LABSITE = {**settings.LABSITE, "MAX_GPUS_PER_USER": 2}
    mine = make(member, n=3, gpus=1)
    theirs = make(other, n=1, gpus=1)
    scheduler.schedule_pass()
    statuses = [Run.objects.get(pk=r.pk).status for r in mine]
    assert statuses.count("launching") == 2
    waiting = Run.objects.get(pk=mine[2].pk)
    assert "2 of 2 GPUs in use" in waiting.waiting_reason
    assert Run.objects.get(pk=theirs[0].pk).status == "launching"


def test_a_blocked_big_run_holds_capacity_after_the_backfill_bound(hosts, member, settings):
    settings.LABSITE = {**settings.LABSITE, "BACKFILL_SECONDS": 60}
    a, b, gpus = hosts
    for g in gpus["b"]:
        g.delete()
    blocker = make(member, gpus=1)[0]
    scheduler.schedule_pass()  # one GPU of node-a taken: 3 free, the big run needs 4
    big = make(member, gpus=4)[0]
    small = make(member, gpus=1)[0]
    scheduler.schedule_pass()
    assert Run.objects.get(pk=small.pk).status == "launching", "small runs may pass, for a while"
    Run.objects.filter(pk=big.pk).update(queued_at=timezone.now() - timedelta(seconds=120))
    later = make(member, gpus=1)[0]
    scheduler.schedule_pass()
    later.refresh_from_db()
    assert later.status == "queued" and f"behind run {big.id}" in later.waiting_reason
    assert Run.objects.get(pk=blocker.pk).status == "launching"


def test_gpuwrap_retries_end_in_no_gpu_and_a_waiting_run_can_be_stopped(hosts, member):
    run = make(member, gpus=8, wrap={"enabled": True, "retries": 2, "retry_delay_seconds": 10})[0]
    scheduler.schedule_pass()
    assert Run.objects.get(pk=run.pk).status == "queued"
    Run.objects.filter(pk=run.pk).update(queued_at=timezone.now() - timedelta(seconds=25))
    scheduler.schedule_pass()
    run.refresh_from_db()
    assert run.status == "failed" and run.reason == "no_gpu" and "needs 8 GPU(s)" in run.error
    forever = make(member, gpus=8)[0]
    Run.objects.filter(pk=forever.pk).update(queued_at=timezone.now() - timedelta(days=3))
    scheduler.schedule_pass()
    assert Run.objects.get(pk=forever.pk).status == "queued"
    stopped = services.run_stop(run=forever, actor=Actor(kind="user", user=member.user))
    assert stopped.status == "stopped"


@pytest.mark.parametrize("full", [True, False], ids=["full", "quick"])
def test_a_plan_past_its_budget_launches_nothing_more(hosts, member, pi, full):
    author = Actor(kind="user", user=member.user)
    plan = services.plan_submit(plan=services.plan_create(actor=author, title="b"), actor=author)
    services.plan_approve(plan=plan, actor=Actor(kind="user", user=pi.user), gpu_hours_budget=1)
    done = make(member, gpus=2, plan=plan)[0]
    Run.objects.filter(pk=done.pk).update(
        status="finished", started_at=timezone.now() - timedelta(hours=1), ended_at=timezone.now()
    )
    waiting = make(member, gpus=1, plan=plan)[0]
    free_run = make(member, gpus=1)[0]
    scheduler.schedule_pass(full=full)
    waiting.refresh_from_db()
    assert waiting.status == "queued" and "2.0 of its 1 GPU-hour budget" in waiting.waiting_reason
    assert Run.objects.get(pk=free_run.pk).status == "launching"
    assert (
        Alert.objects.filter(
            message__contains=f"Plan {plan.id} reached its GPU-hour budget"
        ).count()
        == 1
    )


def test_leases_are_released_when_runs_end(hosts, member):
    run = make(member, gpus=2)[0]
    scheduler.schedule_pass()
    assert GpuLease.objects.filter(run=run, released_at__isnull=True).count() == 2
    services.run_transition(run_id=run.id, to="stopped", actor=Actor.system())
    assert GpuLease.objects.filter(run=run, released_at__isnull=True).count() == 0


def test_a_quick_pass_places_what_a_full_pass_would(hosts, member):
    """GIVEN 8 free GPUs and a mixed queue WHEN a quick pass runs THEN it places the same runs,
    in the same order, as a full pass: the policy is one, only the walk is shorter."""
    big = make(member, gpus=3)
    ones = make(member, n=6, gpus=1)
    scheduler.schedule_pass(full=False)
    assert [Run.objects.get(pk=r.pk).status for r in big + ones] == ["launching"] * 6 + ["queued"]
    assert GpuLease.objects.filter(released_at__isnull=True).count() == 8


def test_a_quick_pass_reads_only_the_head_of_a_long_queue(hosts, member, other):
    """GIVEN 300 queued runs and 2 free GPUs WHEN a quick pass runs THEN it places two runs and
    stops: its queries do not grow with the queue, and the runs it did not reach keep their
    reason until the next full pass."""
    for gpu in hosts[2]["a"] + hosts[2]["b"][:2]:
        gpu.delete()
    runs = make(member, n=300, gpus=1)
    scheduler.schedule_pass(full=False)
    statuses = list(
        Run.objects.filter(pk__in=[r.pk for r in runs]).values_list("status", flat=True)
    )
    assert statuses.count("launching") == 2
    tail = Run.objects.get(pk=runs[-1].pk)
    assert tail.waiting_reason == PENDING_PASS, (
        "a quick pass leaves the runs it never reached alone"
    )

    GpuLease.objects.update(released_at=timezone.now())
    Run.objects.filter(status="launching").update(status="finished")
    with CaptureQueriesContext(connection) as short:
        scheduler.schedule_pass(full=False)
    make(other, n=300, gpus=1)
    GpuLease.objects.update(released_at=timezone.now())
    Run.objects.filter(status="launching").update(status="finished")
    with CaptureQueriesContext(connection) as long:
        scheduler.schedule_pass(full=False)
    assert Run.objects.filter(status="launching").count() == 2
    assert len(long.captured_queries) == len(short.captured_queries)

    scheduler.schedule_pass()  # the timer's full pass gives every waiting run its reason
    tail.refresh_from_db()
    assert tail.waiting_reason == "needs 1 GPU(s); 0 free on node-a, 0 free on node-b"


def test_a_quick_pass_with_nothing_free_reads_only_the_head_of_the_gpu_queue(hosts, member):
    for gpu in hosts[2]["a"] + hosts[2]["b"]:
        gpu.delete()
    make(member, n=50, gpus=1)
    with CaptureQueriesContext(connection) as ctx:
        result = scheduler.schedule_pass(full=False)
    assert result == {"placed": 0, "expired": 0, "waiting": 0}
    gpu_queue_reads = [q["sql"] for q in ctx.captured_queries if '"gpus" > 0' in q["sql"]]
    assert len(gpu_queue_reads) == 1
    assert gpu_queue_reads[0].endswith(f"LIMIT {scheduler.QUICK_FIRST}")


def test_a_quick_pass_for_a_cpu_run_reads_no_gpu(hosts, member):
    """GIVEN only a CPU run waits WHEN a quick pass places it THEN no GPU row is read: the
    kick of a run submitted alone costs the CPU queue, the hosts and the placement."""
    cpu = make(member, gpus=0, wrap={})[0]
    with CaptureQueriesContext(connection) as ctx:
        scheduler.schedule_pass(full=False)
    assert Run.objects.get(pk=cpu.pk).status == "launching"
    assert [q["sql"] for q in ctx.captured_queries if '"clusters_gpu"' in q["sql"]] == []


def test_cpu_runs_never_wait_behind_gpu_runs(hosts, member):
    """GIVEN every GPU taken and GPU runs ahead in the queue WHEN a CPU run is queued
    THEN a quick pass places it at once on the default host."""
    for gpu in hosts[2]["a"] + hosts[2]["b"]:
        gpu.delete()
    make(member, n=5, gpus=2, priority=10)
    cpu = make(member, gpus=0, wrap={})[0]
    scheduler.schedule_pass(full=False)
    cpu.refresh_from_db()
    assert cpu.status == "launching" and cpu.host.name == "node-a"


def test_a_quick_pass_walks_past_runs_that_do_not_fit(hosts, member):
    """Free GPUs that the head of the queue cannot use do not stop the walk: a run further back
    that fits is placed (backfill), over more than one page of the queue."""
    make(member, n=scheduler.QUICK_CHUNK + 10, gpus=5)
    small = make(member, gpus=1)[0]
    scheduler.schedule_pass(full=False)
    assert Run.objects.get(pk=small.pk).status == "launching"


def test_a_pass_for_freed_gpus_leaves_cpu_runs_to_the_others(hosts, member):
    """A GPU run's kick helps GPU runs only: its quick pass (cpu=False) does not read CPU runs; a
    kick for a new run, or the timer's full pass, places them."""
    cpu = make(member, gpus=0, wrap={})[0]
    gpu = make(member, gpus=1)[0]
    scheduler.schedule_pass(full=False, cpu=False)
    assert Run.objects.get(pk=gpu.pk).status == "launching"
    assert Run.objects.get(pk=cpu.pk).status == "queued"
    scheduler.schedule_pass(full=False)
    assert Run.objects.get(pk=cpu.pk).status == "launching"


def test_a_pass_for_a_new_cpu_run_leaves_gpu_runs_to_the_others(
    hosts, member, monkeypatch, django_capture_on_commit_callbacks
):
    """Queuing a CPU run frees nothing for GPU runs: its kick asks for the CPU runs' queue
    only (gpu=False), and that pass reads no GPU run; a GPU run's kick asks the reverse."""
    from experiments import jobs

    asked = []
    monkeypatch.setattr(jobs, "_send", lambda name, *a, **k: asked.append((name, k)))
    actor = Actor(kind="user", user=member.user)
    with django_capture_on_commit_callbacks(execute=True):
        services.run_create(actor=actor, command="true", gpus=0, auto_start=True)
        services.run_create(actor=actor, command="true", gpus=1, auto_start=True)
    assert asked == [
        (jobs.SCHEDULE, {"cpu": True, "gpu": False}),
        (jobs.SCHEDULE, {"cpu": False, "gpu": True}),
    ]
    with CaptureQueriesContext(connection) as ctx:
        scheduler.schedule_pass(full=False, gpu=False)
    assert [q for q in ctx.captured_queries if '"gpus" > 0' in q["sql"]] == []
    assert Run.objects.filter(gpus=0, status="launching").count() == 1
    assert Run.objects.get(gpus=1).status == "queued"
