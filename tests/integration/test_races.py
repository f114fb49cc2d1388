"""Races decided by the database: conditional updates and constraints, on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction

from experiments import services
from experiments.actors import Actor
from experiments.choices import PlanStatus, RunStatus
from experiments.models import GpuLease, PlanEvent, RunEvent
from labsite.errors import Conflict
from tests.factories import GpuFactory


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released together; each thread has its own connection."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def worker(i: int, call: Callable[[], Any]) -> None:
        try:
            barrier.wait()
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - the race's loser is part of the result
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_transitions_leave_exactly_one_winner(member):
    """GIVEN a queued run WHEN a stop (of a waiting run) and a launch race 25 times
    THEN exactly one wins each time, and the audit trail has exactly its event."""
    actor = Actor(kind="user", user=member.user)
    system = Actor.system()
    for _ in range(25):
        run = services.run_create(actor=actor, command="sleep 1", auto_start=True)
        stop, launch = race(
            lambda r=run: services.run_transition(
                run_id=r.id, to=RunStatus.STOPPED, from_=[RunStatus.QUEUED], actor=actor
            ),
            lambda r=run: services.run_transition(
                run_id=r.id, to=RunStatus.LAUNCHING, actor=system
            ),
        )
        assert sorted([stop, launch]) == [False, True]
        run.refresh_from_db()
        assert run.status == (RunStatus.STOPPED if stop else RunStatus.LAUNCHING)
        transitions = RunEvent.objects.filter(run=run).exclude(from_status="")
        assert transitions.count() == 1
        assert transitions.get().to_status == run.status


@pytest.mark.django_db(transaction=True)
def test_many_workers_racing_the_same_transition(member):
    run = services.run_create(
        actor=Actor(kind="user", user=member.user), command="x", auto_start=True
    )
    results = race(
        *[
            lambda: services.run_transition(
                run_id=run.id, to=RunStatus.LAUNCHING, actor=Actor.system()
            )
        ]
        * 8
    )
    assert results.count(True) == 1 and results.count(False) == 7
    assert RunEvent.objects.filter(run=run, to_status=RunStatus.LAUNCHING).count() == 1


@pytest.mark.django_db(transaction=True)
def test_two_pis_deciding_at_once_leave_one_decision(pi, member):
    author = Actor(kind="user", user=member.user)
    plan = services.plan_submit(plan=services.plan_create(actor=author, title="t"), actor=author)
    reviewer = Actor(kind="user", user=pi.user)
    approve, reject = race(
        lambda: services.plan_approve(plan=plan, actor=reviewer),
        lambda: services.plan_reject(plan=plan, actor=reviewer),
    )
    outcomes = [approve, reject]
    assert sum(isinstance(o, Conflict) for o in outcomes) == 1
    plan.refresh_from_db()
    assert plan.status in {PlanStatus.APPROVED, PlanStatus.REJECTED}
    assert PlanEvent.objects.filter(plan=plan, from_status=PlanStatus.PENDING_REVIEW).count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_database_refuses_a_second_active_lease_on_one_gpu(member):
    actor = Actor(kind="user", user=member.user)
    gpu = GpuFactory()
    a = services.run_create(actor=actor, command="a")
    b = services.run_create(actor=actor, command="b")
    GpuLease.objects.create(gpu=gpu, run=a)
    with pytest.raises(IntegrityError), transaction.atomic():
        GpuLease.objects.create(gpu=gpu, run=b)
    # Released leases do not count: the GPU can be leased again.
    GpuLease.objects.filter(run=a).update(released_at="2026-01-01T00:00:00Z")
    GpuLease.objects.create(gpu=gpu, run=b)
    assert GpuLease.objects.filter(gpu=gpu, released_at__isnull=True).get().run_id == b.id


@pytest.mark.django_db(transaction=True)
def test_concurrent_leases_of_one_gpu_one_wins(member):
    actor = Actor(kind="user", user=member.user)
    gpu = GpuFactory()
    runs = [services.run_create(actor=actor, command=f"r{i}") for i in range(6)]
    results = race(*[lambda r=r: GpuLease.objects.create(gpu=gpu, run=r) for r in runs])
    assert sum(isinstance(r, GpuLease) for r in results) == 1
    assert sum(isinstance(r, IntegrityError) for r in results) == 5
