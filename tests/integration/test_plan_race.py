"""An approval racing the creation of its plan's work leaves nothing held (issue 10, bug 1).

On PostgreSQL, with threads (each its own connection): the approval and the release of held
runs are one transaction under the plan's row lock, and creating or starting runs decides held
or queued under the same lock; the scheduler's full pass releases whatever still slips by.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from experiments import scheduler, services
from experiments.actors import Actor
from experiments.models import Plan, Run, RunEvent, Sweep

TRIALS = 50


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released together; each thread has its own connection."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def worker(i: int, call: Callable[[], Any]) -> None:
        try:
            barrier.wait()
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def pending_plan(author: Actor, title: str) -> Plan:
    return services.plan_submit(plan=services.plan_create(actor=author, title=title), actor=author)


@pytest.fixture
def people(transactional_db, member, pi):
    return Actor(kind="user", user=member.user), Actor(kind="user", user=pi.user)


def test_a_run_created_in_the_sweep_while_its_plan_is_approved_is_never_left_held(people):
    """GIVEN a plan under review with a wild sweep WHEN, 50 times, a run is created in the sweep
    (as the API does: the sweep read afresh) while a PI approves the plan THEN no run is held:
    each was either released by the approval or created queued after it."""
    author, reviewer = people
    for i in range(TRIALS):
        plan = pending_plan(author, f"race {i}")
        sweep = services.sweep_create_wild(actor=author, name=f"s{i}", plan=plan)

        def create(sweep_id: str = sweep.id) -> Run:
            fresh = Sweep.objects.select_related("plan").get(pk=sweep_id)
            return services.run_create(actor=author, command="train", sweep=fresh, auto_start=True)

        created, approved = race(
            create, lambda plan=plan: services.plan_approve(plan=plan, actor=reviewer)
        )
        assert isinstance(created, Run), created
        assert isinstance(approved, Plan), approved
    statuses = list(Run.objects.values_list("status", flat=True))
    assert len(statuses) == TRIALS
    assert statuses.count("held") == 0, f"{statuses.count('held')} of {TRIALS} runs left held"
    assert set(statuses) == {"queued"}


def test_a_grid_and_a_start_racing_the_approval_are_never_left_held(people):
    """The same for a grid expanded under the plan, and for a ready run started meanwhile."""
    author, reviewer = people
    for i in range(TRIALS // 2):
        plan = pending_plan(author, f"grid {i}")
        sweep = services.sweep_create_wild(actor=author, name=f"w{i}", plan=plan)
        ready = services.run_create(actor=author, command="train", sweep=sweep)

        def grid(plan_id: str = plan.id, i: int = i) -> Sweep:
            return services.sweep_create_grid(
                actor=author,
                name=f"g{i}",
                base_command="train",
                parameters={"lr": [1, 2, 3]},
                auto_start=True,
                plan=Plan.objects.get(pk=plan_id),
            )

        def start(run_id: str = ready.id) -> Run:
            run = Run.objects.select_related("plan", "sweep__plan").get(pk=run_id)
            return services.run_start(run=run, actor=author)

        results = race(
            grid, start, lambda plan=plan: services.plan_approve(plan=plan, actor=reviewer)
        )
        assert not [r for r in results if isinstance(r, Exception)], results
    assert not Run.objects.filter(status="held").exists()
    assert Run.objects.filter(status="queued").count() == (TRIALS // 2) * 4


def test_a_held_run_whose_plan_was_approved_around_the_release_is_released_by_a_full_pass(
    people,
):
    """GIVEN a held run whose plan became approved without releasing it (the row edited by
    hand; what a crash between two transactions left behind before this fix) WHEN the timer's
    full pass runs THEN the run is queued, with an audited event."""
    author, _ = people
    plan = pending_plan(author, "edited")
    sweep = services.sweep_create_wild(actor=author, name="s", plan=plan)
    direct = services.run_create(actor=author, command="a", plan=plan, auto_start=True)
    in_sweep = services.run_create(actor=author, command="b", sweep=sweep, auto_start=True)
    other = services.run_create(
        actor=author, command="c", plan=pending_plan(author, "still pending"), auto_start=True
    )
    assert {direct.status, in_sweep.status, other.status} == {"held"}
    Plan.objects.filter(pk=plan.pk).update(status="approved")

    result = scheduler.schedule_pass(full=True)

    assert result.get("released") == 2, result
    for run in (direct, in_sweep):
        run.refresh_from_db()
        assert run.status == "queued" and run.waiting_reason, (run.status, run.waiting_reason)
        event = RunEvent.objects.get(run=run, to_status="queued")
        assert (event.from_status, event.reason, event.actor_kind) == (
            "held",
            "plan_approved",
            "system",
        )
    assert Run.objects.get(pk=other.pk).status == "held", "a plan not approved keeps its runs"
    assert scheduler.schedule_pass(full=True).get("released") is None, "released once"
