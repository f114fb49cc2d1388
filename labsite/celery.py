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

    from clusters import tasks as cluster_tasks
    from experiments import jobs

    lab = settings.LABSITE
    for interval, task, kwargs in cluster_tasks.periodic(lab) + jobs.periodic(lab):
        # A tick that could not run in time is dropped, not piled up behind the next one.
        signature = sender.signature(task, kwargs=kwargs, expires=interval)
        sender.add_periodic_task(interval, signature, name=task)
