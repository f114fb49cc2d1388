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

    lab = settings.LABSITE
    for interval, task, kwargs in [
        (lab["INVENTORY_INTERVAL_SECONDS"], "clusters.tasks.refresh_local_inventory", {}),
        (lab["POLL_INTERVAL_SECONDS"], "experiments.tasks.poll_all", {}),
        # The timer's pass is the full one: reasons, no_gpu expiry, anything a kick missed.
        (lab["SCHEDULE_INTERVAL_SECONDS"], "experiments.tasks.schedule", {"full": True}),
        (lab["RECONCILE_INTERVAL_SECONDS"], "experiments.tasks.reconcile", {}),
    ]:
        # A tick that could not run in time is dropped, not piled up behind the next one.
        signature = sender.signature(task, kwargs=kwargs, expires=interval)
        sender.add_periodic_task(interval, signature, name=task)
