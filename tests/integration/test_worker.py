"""A real Celery worker, fed through real Redis, writing to real PostgreSQL."""

from __future__ import annotations

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
