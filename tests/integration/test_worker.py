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
