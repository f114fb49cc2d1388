"""A real Celery worker, fed through real Redis, writing to real PostgreSQL."""

from __future__ import annotations

import time

from clusters.models import Host
from clusters.tasks import refresh_local_inventory
from tests.harness.worker import wait_for


def test_worker_runs_the_inventory_task_and_writes_the_database(celery_worker):
    """GIVEN a worker WHEN the inventory task is sent through Redis THEN host `local` is recorded."""
    assert not Host.objects.filter(name="local").exists()
    refresh_local_inventory.delay()
    host = wait_for(lambda: Host.objects.filter(name="local", inventory_at__isnull=False).first())
    assert host.kind == "local"
    assert host.state == "online"
    # This machine has no GPU: the host is a CPU host with a note saying why, not "busy".
    if not host.gpus.exists():
        assert host.state_note.startswith("CPU host")


def test_one_at_a_time_serves_a_request_that_came_during_a_run(db):
    """GIVEN a body running under the lock WHEN the same work is asked for meanwhile THEN the
    asker returns at once without running it, and the holder runs it once more: never two at
    a time, no request lost (the scheduler's passes and each host's polls work this way)."""
    from experiments.tasks import _one_at_a_time
    from tests.harness.worker import redis_test_client

    redis_test_client().flushdb()
    calls: list[str] = []

    def body() -> None:
        calls.append("run")
        if len(calls) == 1:
            _one_at_a_time("test-serial", lambda: calls.append("overlap"))
            calls.append("asked")

    _one_at_a_time("test-serial", body)
    assert calls == ["run", "asked", "run"]
    assert not redis_test_client().exists("labsite:test-serial")  # the lock is released


def test_a_timer_poll_right_after_another_poll_is_skipped(db, settings, monkeypatch):
    """GIVEN a host polled a moment ago (a watcher's wake-up) WHEN the timer's polls are sent
    within half an interval THEN that host is skipped and the others are polled; once half an
    interval has passed it is polled again (so at least once every 1.5 ticks)."""
    from experiments import runner, tasks
    from tests.harness.worker import redis_test_client

    redis_test_client().flushdb()
    settings.LABSITE = {**settings.LABSITE, "POLL_INTERVAL_SECONDS": 1.0}
    polled: list[int] = []
    sent: list[int] = []
    monkeypatch.setattr(runner, "host_sync", lambda host_id: polled.append(host_id) or {})
    monkeypatch.setattr(runner, "hosts_to_poll", lambda: [7, 8])
    monkeypatch.setattr(tasks.poll_host, "delay", lambda host_id: sent.append(host_id))
    tasks.poll_host(7)
    tasks.poll_all()
    assert (polled, sent) == ([7], [8])
    time.sleep(0.6)
    tasks.poll_all()
    assert sent == [8, 7, 8]


def test_a_poll_that_saw_runs_end_runs_the_quick_pass_itself(member, monkeypatch):
    """GIVEN a queued GPU run and a free GPU WHEN a poll finds that runs ended (GPUs freed)
    THEN the poll task runs one quick, GPU-only scheduler pass itself (the real one, which
    places the run), with no second task; a poll that freed nothing runs none. Only the host's
    answer is stubbed: this is about what the task does with it."""
    from clusters.models import Host
    from experiments import jobs, runner, scheduler, services, tasks
    from experiments.actors import Actor
    from experiments.models import GpuLease, Run
    from tests.factories import GpuFactory
    from tests.harness.worker import redis_test_client

    redis_test_client().flushdb()
    host = Host.objects.create(
        name="node-a", kind="ssh", hostname="10.0.0.1", state="online", gpu_source="nvidia-smi"
    )
    gpu = GpuFactory(host=host, index=0)
    run = services.run_create(
        actor=Actor(kind="user", user=member.user),
        command="train",
        gpuwrap_config={"enabled": True},
        auto_start=True,
        kick=False,
    )
    passes: list[dict] = []
    real_pass = scheduler.schedule_pass
    monkeypatch.setattr(
        scheduler, "schedule_pass", lambda **kw: passes.append(kw) or real_pass(**kw)
    )
    sent: list[str] = []
    monkeypatch.setattr(jobs, "_send", lambda name, *args, **kw: sent.append(name))
    monkeypatch.setattr(runner, "host_sync", lambda host_id: {"runs": 2, "freed": host_id == 1})
    tasks.poll_host(2)
    assert passes == []
    assert Run.objects.get(pk=run.pk).status == "queued"
    tasks.poll_host(1)
    assert passes == [{"full": False, "cpu": True, "gpu": True}]
    assert Run.objects.get(pk=run.pk).status == "launching"
    assert GpuLease.objects.get(run=run, released_at__isnull=True).gpu_id == gpu.id
    assert "experiments.tasks.schedule" not in sent


def _sessions() -> int:
    """Connections ever made to the test database (PostgreSQL counts them: pg_stat_database)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return int(cursor.fetchone()[0])


def test_the_worker_keeps_its_database_connections_across_tasks(celery_worker):
    """GIVEN a worker WHEN it runs 30 scheduler passes, one after another THEN its processes
    reuse their PostgreSQL connections (CONN_MAX_AGE) instead of connecting anew around every
    task, as Celery's Django fixup does by default (5 ms of every pass and dispatch)."""
    from django.db import connection

    from labsite.celery import app

    assert connection.vendor == "postgresql"
    passes = lambda: celery_worker.log_text.count("schedule pass (")  # noqa: E731
    app.send_task("experiments.tasks.schedule")
    wait_for(lambda: passes() >= 1)
    time.sleep(1.5)  # a session's count reaches the statistics within a second
    before = _sessions()
    for n in range(2, 32):
        app.send_task("experiments.tasks.schedule")
        wait_for(lambda n=n: passes() >= n)
    time.sleep(1.5)
    made = _sessions() - before
    # The worker has 4 processes; any of them may take a task. The old way made 30 or more.
    assert made <= 6, f"{made} new connections for 30 tasks"
