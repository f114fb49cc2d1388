"""Cancel: stop a run on its host, and record `stopped` once nothing of it is left."""

from __future__ import annotations

import logging

from django.conf import settings

from clusters import slurm_pacing
from clusters.executors import (
    SlurmExecutor,
    TransportError,
    executor_for,
)
from experiments import jobs, services
from experiments.actors import Actor
from experiments.choices import ACTIVE, RunReason, RunStatus
from experiments.models import Run
from experiments.rundir import run_dir_name
from experiments.runner.sync import host_sync

log = logging.getLogger(__name__)
SYSTEM = Actor.system()


def run_cancel(run_id: str) -> None:
    """Stop a launching or running run on its host, then record `stopped`."""
    run = Run.objects.select_related("host").filter(pk=run_id).first()
    if run is None or run.status not in ACTIVE or run.host is None:
        return
    executor = None
    try:
        executor = executor_for(run.host)
        where = {
            "run_id": run.id,
            "run_root": run.host.run_root,
            "dir_name": run_dir_name(run),
            "grace_seconds": settings.LABSITE["STOP_GRACE_SECONDS"],
        }
        if isinstance(executor, SlurmExecutor):
            left = executor.cancel(**where, job_id=run.slurm_job_id)
        else:
            left = executor.cancel(**where)
    except TransportError as exc:
        log.warning("cancel of %s: %s (retried by the reconcile pass)", run_id, exc)
        return
    finally:
        if isinstance(executor, SlurmExecutor):
            slurm_pacing.record_calls(run.host.pk, executor.calls)
            slurm_pacing.reset(run.host.pk)
    if left:
        log.error("cancel of %s left %d process(es) on %s", run_id, left, run.host.name)
        return
    # Nothing of it is left: copy the last output and record the end (with its exit code).
    freed = bool(host_sync(run.host.pk, cancelled=frozenset([run.id])).get("freed"))
    freed |= services.run_transition(
        run_id=run_id,
        to=RunStatus.STOPPED,
        from_=list(ACTIVE),
        actor=SYSTEM,
        reason=RunReason.USER_STOP,
        message="stopped on the host",
    )
    if freed:
        jobs.kick_scheduler()
