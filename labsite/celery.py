"""The Celery app: Redis broker, tasks discovered in the apps, beat drives the timers."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "labsite.settings")

app = Celery("labsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_finalize.connect
def _beat_schedule(sender: Celery, **_: object) -> None:
    from django.conf import settings

    sender.add_periodic_task(
        settings.LABSITE["INVENTORY_INTERVAL_SECONDS"],
        sender.signature("clusters.tasks.refresh_local_inventory"),
        name="refresh local inventory",
    )
