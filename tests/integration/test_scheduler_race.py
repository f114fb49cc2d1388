"""Two scheduler passes forced to race on PostgreSQL never lease one GPU twice."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from clusters.models import Host
from experiments import scheduler, services
from experiments.actors import Actor
from experiments.models import GpuLease, Run
from tests.factories import GpuFactory


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kinds", [(True, True, True), (False, False, True)], ids=["full", "mixed"])
def test_racing_scheduler_passes_lease_each_gpu_once(member, kinds):
    host = Host.objects.create(
        name="racer", kind="ssh", hostname="10.0.0.1", state="online", gpu_source="nvidia-smi"
    )
    gpus = [GpuFactory(host=host, index=i) for i in range(4)]
    actor = Actor(kind="user", user=member.user)
    runs = [
        services.run_create(
            actor=actor,
            command=f"r{i}",
            auto_start=True,
            kick=False,
            gpuwrap_config={"enabled": True},
        )
        for i in range(12)
    ]
    barrier = threading.Barrier(3)
    results: list[object] = []

    def one_pass(full: bool) -> None:
        try:
            barrier.wait()
            results.append(scheduler.schedule_pass(full=full))
        except Exception as exc:  # noqa: BLE001 - a crash is a result the test reports
            results.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=one_pass, args=(full,)) for full in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, dict) for r in results), results
    active = GpuLease.objects.filter(released_at__isnull=True)
    assert active.count() == 4
    assert sorted(active.values_list("gpu_id", flat=True)) == sorted(g.id for g in gpus)
    launching = Run.objects.filter(pk__in=[r.id for r in runs], status="launching")
    assert launching.count() == 4
    assert set(active.values_list("run_id", flat=True)) == set(
        launching.values_list("id", flat=True)
    )
    waiting = Run.objects.filter(pk__in=[r.id for r in runs], status="queued")
    assert waiting.count() == 8
    scheduler.schedule_pass()  # the timer's pass: every run still waiting says why
    assert all(r.waiting_reason.startswith("needs 1 GPU(s); 0 free on racer") for r in waiting)
