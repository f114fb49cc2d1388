"""The scheduler task starts what its pass placed itself, after the scheduler lock is released.

No worker runs here: the task is called in this process (real PostgreSQL, Redis and local
processes), and the tasks it would send are recorded instead of queued.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from clusters.services import host_ensure_local
from experiments import jobs, runner, scheduler, services, tasks
from experiments.actors import Actor
from experiments.models import Run
from tests.harness.localruns import run_user_dir
from tests.harness.worker import redis_test_client, wait_for

pytestmark = pytest.mark.django_db(transaction=True)  # placements send on commit


@pytest.fixture
def scratch():
    with run_user_dir() as path:
        yield path


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, tuple[Any, ...]]]:
    """The tasks the code under test sends (name, args), recorded instead of queued."""
    redis_test_client().flushdb()
    tasks_sent: list[tuple[str, tuple[Any, ...]]] = []
    monkeypatch.setattr(jobs, "_send", lambda name, *args, **kw: tasks_sent.append((name, args)))
    return tasks_sent


@pytest.fixture
def queue(member, scratch, sent):
    """`queue(command)`: a queued CPU run on the local host (its runs go under `scratch`)."""
    host = host_ensure_local()
    host.enabled, host.run_root = True, str(scratch / "runs")
    host.save(update_fields=["enabled", "run_root"])
    actor = Actor(kind="user", user=member.user)

    def make(command: str) -> Run:
        return services.run_create(
            actor=actor, command=command, host=host, gpus=0, auto_start=True, kick=False
        )

    make.actor = actor  # type: ignore[attr-defined]
    return make


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_run_placed_by_the_scheduler_task_starts_from_it_once(queue, sent, scratch):
    """GIVEN a queued run WHEN the scheduler task runs THEN the run is started by that task
    (running, one dispatch attempt) and no dispatch task goes through the broker; WHEN a
    dispatch of it arrives anyway (a poll's resend) THEN nothing starts a second time."""
    marker = scratch / "started"
    run = queue(f"echo once >> {marker}")
    tasks.schedule()
    done = Run.objects.get(pk=run.pk)
    assert (done.status, done.dispatch_attempts) == ("running", 1)
    assert done.pid
    assert [name for name, _ in sent if name == jobs.DISPATCH] == []
    assert not redis_test_client().exists("labsite:scheduler")  # the lock was let go
    runner.run_dispatch(run.id)
    wait_for(lambda: lines(marker), timeout=10, what="the run's command to run")
    time.sleep(0.5)
    assert lines(marker) == ["once"]
    assert Run.objects.get(pk=run.pk).dispatch_attempts == 1


def test_a_pass_that_places_several_runs_starts_one_and_sends_the_others(queue, sent):
    """GIVEN three queued CPU runs WHEN one scheduler task places them all THEN
    it starts one itself and sends one dispatch task for each of the others, as their
    placements commit, so that the worker's other processes launch them in parallel."""
    runs = [queue("true") for _ in range(3)]
    tasks.schedule()
    status = dict(Run.objects.filter(pk__in=[r.pk for r in runs]).values_list("id", "status"))
    started = [run_id for run_id, s in status.items() if s == "running"]
    assert len(started) == tasks.INLINE_DISPATCHES == 1
    dispatched = [args[0] for name, args in sent if name == jobs.DISPATCH]
    assert sorted(dispatched) == sorted(set(status) - set(started))
    assert all(status[run_id] == "launching" for run_id in dispatched)


def test_a_run_stopped_between_its_placement_and_the_inline_dispatch_never_starts(
    queue, sent, scratch, monkeypatch
):
    """GIVEN a run the pass has just placed (launching, committed), its dispatch held by the
    scheduler task WHEN it is stopped before the task starts it THEN the task does not start
    it, and the cancel that the stop sends records it `stopped` without its command running."""
    late = scratch / "late-executed"
    run = queue(f"touch {late}")
    real_pass = scheduler.schedule_pass

    def pass_then_stop(**kw: Any) -> dict[str, int]:
        result = real_pass(**kw)
        placed = Run.objects.get(pk=run.pk)
        assert placed.status == "launching"
        services.run_stop(run=placed, actor=queue.actor)
        return result

    monkeypatch.setattr(scheduler, "schedule_pass", pass_then_stop)
    tasks.schedule()
    assert (jobs.CANCEL, (run.id,)) in sent
    assert [name for name, _ in sent if name == jobs.DISPATCH] == []
    assert Run.objects.get(pk=run.pk).dispatch_attempts == 0  # never tried
    runner.run_cancel(run.id)
    runner.run_dispatch(run.id)  # a late dispatch changes nothing either
    time.sleep(1)
    assert not late.exists(), "the stopped run's command ran"
    done = Run.objects.get(pk=run.pk)
    assert (done.status, done.reason, done.pid) == ("stopped", "user_stop", None)


def test_a_pass_that_raises_still_sends_what_it_placed(queue, sent, monkeypatch):
    """GIVEN a pass that places a run and then fails WHEN the scheduler task runs it THEN the
    error reaches the task, and the run it placed (committed) goes out as a dispatch task
    instead of waiting for a poll to notice it."""
    run = queue("true")
    real_pass = scheduler.schedule_pass

    def pass_then_fail(**kw: Any) -> dict[str, int]:
        real_pass(**kw)
        raise RuntimeError("after the placement")

    monkeypatch.setattr(scheduler, "schedule_pass", pass_then_fail)
    with pytest.raises(RuntimeError):
        tasks.schedule()
    assert (jobs.DISPATCH, (run.id,)) in sent
    assert Run.objects.get(pk=run.pk).status == "launching"
    assert not redis_test_client().exists("labsite:scheduler")
