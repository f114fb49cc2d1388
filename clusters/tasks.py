"""Celery entry points for machines: thin wrappers around services, and the typed calls
(`probe_later`, `refresh_local_later`) that web requests use to ask for them.

A request never probes or reads an inventory itself (SSH, nvidia-smi and sinfo can hang); it
asks a worker, answers at once with what the database knows, and the client polls.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.db import transaction

from clusters import services
from clusters.choices import HostKind
from clusters.models import Host

log = logging.getLogger(__name__)

REFRESH_LOCAL = "clusters.tasks.refresh_local_inventory"


@shared_task(name=REFRESH_LOCAL, ignore_result=True)
def refresh_local_inventory() -> None:
    host = services.inventory_refresh_local()
    services.host_check_run_user_reach(host)
    services.slurm_detect()
    # Slurm clusters reached over SSH: their login nodes detect again, each in its own task.
    remote = Host.objects.filter(enabled=True, kind=HostKind.SLURM).exclude(
        hostname__in=("", "localhost")
    )
    for host_id in remote.values_list("pk", flat=True):
        _send(probe_host, host_id)


@shared_task(name="clusters.tasks.probe_host", ignore_result=True)
def probe_host(host_id: int) -> None:
    services.host_probe(host_id)


def _send(task: Any, *args: Any) -> None:
    try:
        task.delay(*args)
    except Exception:  # noqa: BLE001 - a broker outage must not fail the request that asked
        # Nothing is lost but time: beat refreshes the inventory, and a client that sees no
        # new probed_at asks again.
        log.warning("could not enqueue %s%r", task.name, args)


def probe_later(host_id: int) -> None:
    """Probe the host in a worker once the caller's transaction commits (the row must exist)."""
    transaction.on_commit(lambda: _send(probe_host, host_id))


def refresh_local_later() -> None:
    """Read the server's own GPUs and Slurm's sinfo in a worker, after the caller commits."""
    transaction.on_commit(lambda: _send(refresh_local_inventory))


def periodic(lab: dict[str, Any]) -> list[tuple[float, str, dict[str, Any]]]:
    """What beat sends for the machines and how often: (interval seconds, task, kwargs)."""
    return [(lab["INVENTORY_INTERVAL_SECONDS"], REFRESH_LOCAL, {})]
