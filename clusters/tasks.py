"""Celery entry points for machines: thin wrappers around services."""

from celery import shared_task

from clusters import services


@shared_task(name="clusters.tasks.refresh_local_inventory", ignore_result=True)
def refresh_local_inventory() -> None:
    services.inventory_refresh_local()
    services.slurm_detect()
