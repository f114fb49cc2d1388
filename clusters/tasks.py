"""Celery entry points for machines: thin wrappers around services."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from clusters import services

REFRESH_LOCAL = "clusters.tasks.refresh_local_inventory"


@shared_task(name=REFRESH_LOCAL, ignore_result=True)
def refresh_local_inventory() -> None:
    services.inventory_refresh_local()
    services.slurm_detect()


@shared_task(name="clusters.tasks.probe_host", ignore_result=True)
def probe_host(host_id: int) -> None:
    services.host_probe(host_id)


def periodic(lab: dict[str, Any]) -> list[tuple[float, str, dict[str, Any]]]:
    """What beat sends for the machines and how often: (interval seconds, task, kwargs)."""
    return [(lab["INVENTORY_INTERVAL_SECONDS"], REFRESH_LOCAL, {})]
