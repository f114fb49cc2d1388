"""The only module that knows Celery: what the lab's code asks the workers to do, typed.

Follow a run id from the API to its host through these functions: each names one task of
experiments/tasks.py. Where a worker must see rows that the caller's transaction writes, the
task is sent once that transaction commits (`transaction.on_commit`; at once outside one). A
broker outage costs nothing but time: it is logged, and the periodic passes (PERIODIC, driven
by beat) pick up whatever a lost message would have done.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

log = logging.getLogger(__name__)

SCHEDULE = "experiments.tasks.schedule"
DISPATCH = "experiments.tasks.dispatch_run"
POLL_HOST = "experiments.tasks.poll_host"
POLL_ALL = "experiments.tasks.poll_all"
CANCEL = "experiments.tasks.cancel_run"
RECONCILE = "experiments.tasks.reconcile"


def _send(task_name: str, *args: Any, **kwargs: Any) -> None:
    from labsite.celery import app

    try:
        app.send_task(task_name, args=args, kwargs=kwargs)
    except Exception:  # noqa: BLE001 - the beat-driven passes repair anything missed here
        log.warning("could not enqueue %s%r; the periodic pass will pick it up", task_name, args)


def _after_commit(task_name: str, *args: Any, **kwargs: Any) -> None:
    transaction.on_commit(lambda: _send(task_name, *args, **kwargs))


def kick_scheduler(*, cpu: bool = True) -> None:
    """A quick scheduler pass once the current transaction commits (cheap when one runs).

    cpu=False when what changed can only help GPU runs (a run ended and freed its GPUs): a CPU
    run waits for a host, never for a GPU, so that pass need not read the CPU runs' queue.
    """
    _after_commit(SCHEDULE, cpu=cpu)


def dispatch_later(run_id: str) -> None:
    """Start a placed (launching) run on its host, once its lease is committed."""
    _after_commit(DISPATCH, run_id)


def cancel_later(run_id: str) -> None:
    """Cancel a stopping run on its host, once the stop request is committed."""
    _after_commit(CANCEL, run_id)


def poll_soon(host_id: int) -> None:
    """Poll a host now (its polls never overlap: one asked for during a poll runs after it)."""
    _send(POLL_HOST, host_id)


def periodic(lab: dict[str, Any]) -> list[tuple[float, str, dict[str, Any]]]:
    """What beat sends and how often: (interval seconds, task, kwargs)."""
    return [
        (lab["POLL_INTERVAL_SECONDS"], POLL_ALL, {}),
        # The timer's pass is the full one: reasons, no_gpu expiry, anything a kick missed.
        (lab["SCHEDULE_INTERVAL_SECONDS"], SCHEDULE, {"full": True}),
        (lab["RECONCILE_INTERVAL_SECONDS"], RECONCILE, {}),
    ]
