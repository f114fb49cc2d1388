"""The only module that knows Celery: what the lab's code asks the workers to do, typed.

Follow a run id from the API to its host through these functions: each names one task of
experiments/tasks.py. Where a worker must see rows that the caller's transaction writes, the
task is sent once that transaction commits (`transaction.on_commit`; at once outside one). A
broker outage costs nothing but time: it is logged, and the periodic passes (PERIODIC, driven
by beat) pick up whatever a lost message would have done.

The scheduler task holds back the dispatches its pass asks for (dispatches_held) and starts
them itself once it has let go of the scheduler lock: a run submitted alone then goes from
placement to its host without a second trip through the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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


def kick_scheduler(*, cpu: bool = True, gpu: bool = True) -> None:
    """A quick scheduler pass once the current transaction commits (cheap when one runs).

    It reads only the queues that what changed can help: gpu=False when a CPU run was queued
    (nothing was freed for the GPU runs, which the last pass already looked at), cpu=False
    when a GPU run was. A run that ended frees CPU slots and GPUs: both.
    """
    _after_commit(SCHEDULE, cpu=cpu, gpu=gpu)


# Where dispatches_held is in force: the list it fills, and how many it may hold.
_held_dispatches: ContextVar[tuple[list[str], int] | None] = ContextVar(
    "held_dispatches", default=None
)


def dispatch_later(run_id: str) -> None:
    """Start a placed (launching) run on its host, once its lease is committed (inside
    dispatches_held, maybe by the holder)."""
    transaction.on_commit(lambda: _dispatch_committed(run_id))


def dispatch_in(run_id: str, seconds: float, *, reserved: bool = False) -> None:
    """Start a placed run on its host in `seconds` (a Slurm cluster's submissions are paced:
    `reserved`, the slot is the run's already)."""
    from labsite.celery import app

    try:
        app.send_task(DISPATCH, args=(run_id,), kwargs={"reserved": reserved}, countdown=seconds)
    except Exception:  # noqa: BLE001 - the beat-driven passes repair anything missed here
        log.warning("could not enqueue %s(%r); the periodic pass will pick it up", DISPATCH, run_id)


def _dispatch_committed(run_id: str) -> None:
    held = _held_dispatches.get()
    if held is not None and len(held[0]) < held[1]:
        held[0].append(run_id)
    else:
        _send(DISPATCH, run_id)


@contextmanager
def dispatches_held(limit: int) -> Iterator[list[str]]:
    """Within, the first `limit` placements to commit are collected, not sent: the caller
    must start them (runner.run_dispatch) with no lock held, or send them (dispatch_later,
    outside). Later ones go out as tasks at once, for the worker's other processes to launch
    in parallel. A placement rolled back never reaches the list."""
    held: list[str] = []
    token = _held_dispatches.set((held, limit))
    try:
        yield held
    finally:
        _held_dispatches.reset(token)


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
