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
    """GIVEN a host polled a moment ago (a watcher's wake-up) WHEN the timer's poll arrives
    within half an interval THEN it is skipped; wake-up polls never are, and the timer's poll
    runs again once half an interval has passed (a host is polled at least every 1.5 ticks)."""
    from experiments import runner, tasks
    from tests.harness.worker import redis_test_client

    redis_test_client().flushdb()
    settings.LABSITE = {**settings.LABSITE, "POLL_INTERVAL_SECONDS": 1.0}
    polled: list[str] = []
    monkeypatch.setattr(runner, "host_poll", lambda host_id: polled.append(host_id))
    tasks.poll_host(7)
    tasks.poll_host(7, tick=True)
    tasks.poll_host(8, tick=True)  # another host: its own clock
    tasks.poll_host(7)
    assert polled == [7, 8, 7]
    time.sleep(0.6)
    tasks.poll_host(7, tick=True)
    assert polled == [7, 8, 7, 7]
