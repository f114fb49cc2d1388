"""The Celery app: Redis broker, tasks discovered in the apps, beat drives the timers."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task
from celery.signals import task_postrun, task_prerun, worker_init

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


@task_prerun.connect
@task_postrun.connect
def _database_connections(task: Task | None = None, **_: Any) -> None:
    """Around every task, Django's own rule for its connections, as around every request: one
    is reused until it errs or is older than CONN_MAX_AGE (DB_CONN_MAX_AGE).

    Celery's Django fixup would close them before and after each task instead (unless
    CELERY_DB_REUSE_MAX, which settings set out of its way): every task then opened a new
    PostgreSQL connection, 5 ms of each scheduler pass and dispatch on a 2-core server.
    Eager tasks (tests) run inside their caller's transaction: its connection stays as it is.
    """
    if task is not None and getattr(task.request, "is_eager", False):
        return
    from django.db import close_old_connections

    close_old_connections()


@worker_init.connect
def _share_with_the_pool(**_: Any) -> None:
    """Before the pool forks: what every task runs is imported, then frozen out of the
    collector's reach, so the pool's processes share those pages with the worker instead of
    each writing its own copy (measured with 2 processes: 171 MB PSS before, 139 after)."""
    import gc

    import django

    django.setup()
    from clusters import tasks as _clusters  # noqa: F401
    from experiments import tasks as _experiments  # noqa: F401

    gc.collect()
    gc.freeze()
