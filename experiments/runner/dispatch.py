"""Dispatch: start a placed run on its host, once (a second dispatch finds the first)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from django.db.models import F

from clusters.choices import HostKind
from clusters.executors import (
    HostKeyMismatch,
    LaunchSpec,
    ProtocolError,
    SlurmExecutor,
    TransportError,
    executor_for,
)
from clusters.models import Host
from experiments import jobs, services
from experiments.actors import Actor
from experiments.choices import RunReason, RunStatus
from experiments.models import GpuLease, Run
from experiments.rundir import run_dir_name
from experiments.runner import slurm
from experiments.runner.hosts import host_key_mismatch
from labsite.compiled import Compiled

log = logging.getLogger(__name__)
SYSTEM = Actor.system()
# The run with its host, compiled once per process (labsite.compiled): the dispatch's first read.
_RUN_AND_HOST = Compiled(lambda pk: Run.objects.select_related("host").filter(pk=pk), arity=1)


def launch_spec(run: Run, host: Host) -> LaunchSpec:
    indices: list[int] = []
    if run.gpus:  # a run that asked for no GPU was placed without a lease: no query for it
        indices = sorted(
            GpuLease.objects.filter(run=run, released_at__isnull=True).values_list(
                "gpu__index", flat=True
            )
        )
    wrap = run.gpuwrap_config or {}
    pin = bool(indices) or (wrap.get("enabled") and host.kind != HostKind.SLURM)
    return LaunchSpec(
        run_id=run.id,
        dir_name=run_dir_name(run),
        command=run.command,
        run_root=host.run_root,
        workdir=run.workdir,
        env=dict(run.env),
        env_setup=host.env_setup,
        cuda_visible_devices=indices if pin else None,
    )


def run_dispatch(run_id: str, *, reserved: bool = False) -> None:
    """Start a launching run on its host; safe to run twice (the host keeps the first start).
    `reserved`: a Slurm submission whose slot in its cluster's pace is already taken."""
    began = time.time()
    found = _RUN_AND_HOST.instances(run_id)
    run = found[0] if found else None
    if not isinstance(run, Run) or run.status != RunStatus.LAUNCHING or run.host is None:
        return
    if run.stop_requested_at is not None:
        # Stopped before it started: the cancel (which leaves a marker no later launch passes)
        # ends it. A dispatch sent before the stop, or resent by a poll, must not start it.
        return
    Run.objects.filter(pk=run_id).update(dispatch_attempts=F("dispatch_attempts") + 1)
    try:
        executor = executor_for(run.host)
        if isinstance(executor, SlurmExecutor):
            if throttle := slurm.array_throttle(run):
                slurm.submit_array(run, run.host, executor, throttle, launch_spec)
                return
            spec = replace(launch_spec(run, run.host), sbatch_args=slurm.sbatch_args(run, run.host))
            slurm.submit(run, run.host, executor, spec, reserved=reserved)
            return
        spec = launch_spec(run, run.host)
        exec_began = time.time()
        pid = executor.launch(spec)
        exec_ms = (time.time() - exec_began) * 1000
    except HostKeyMismatch as exc:
        host_key_mismatch(run.host, exc)
        return
    except TransportError as exc:
        log.warning("dispatch of %s: %s (the reconcile pass retries)", run_id, exc)
        return
    except (ProtocolError, ValueError) as exc:
        if services.run_transition(
            run_id=run_id,
            to=RunStatus.FAILED,
            from_=[RunStatus.LAUNCHING],
            actor=SYSTEM,
            reason=RunReason.LAUNCH_ERROR,
            message=str(exc),
            fields={"error": str(exc)[:2000]},
        ):
            jobs.kick_scheduler()  # its CPU slots and GPUs are free again: the next run, now
        return
    if pid is None:
        if services.run_transition(
            run_id=run_id,
            to=RunStatus.STOPPED,
            from_=[RunStatus.LAUNCHING],
            actor=SYSTEM,
            reason=RunReason.USER_STOP,
            message="cancelled before it started",
        ):
            jobs.kick_scheduler()
        return
    services.run_transition(
        run_id=run_id,
        to=RunStatus.RUNNING,
        from_=[RunStatus.LAUNCHING],
        actor=SYSTEM,
        message=f"pid {pid} on {run.host.name}",
        fields={"pid": pid},
    )
    # The epoch stamps let the benchmarks line a dispatch up with its run's other stages.
    log.info(
        "dispatch of %s: pid %s on %s, exec %.1f ms (began %.6f, exec began %.6f)",
        run_id,
        pid,
        run.host.name,
        exec_ms,
        began,
        exec_began,
    )
