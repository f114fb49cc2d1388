"""A host's runs in line with what the host says: one round trip per host per cycle."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.utils import timezone

from clusters import slurm_pacing
from clusters.choices import HostKind
from clusters.executors import (
    HostKeyMismatch,
    ProtocolError,
    RunRef,
    RunReport,
    SlurmExecutor,
    TransportError,
    executor_for,
)
from clusters.models import Host
from clusters.services import (
    host_mark_seen,
    inventory_from_report,
    inventory_refresh_local,
)
from experiments import jobs, services
from experiments.actors import Actor
from experiments.choices import ACTIVE, RunReason, RunStatus
from experiments.models import GpuLease, Run
from experiments.rundir import run_dir_name
from experiments.runner import slurm
from experiments.runner.ending import end_failed, end_run
from experiments.runner.hosts import host_answered, host_key_mismatch, host_unreachable
from experiments.runner.output import copy_outputs

log = logging.getLogger(__name__)
SYSTEM = Actor.system()


def host_sync(host_id: int, *, cancelled: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One round trip to the host for all its active runs and its GPUs; the database follows.

    A run whose stop was asked for ends only once its cancel confirmed that nothing of it is
    left on the host (`cancelled`, from run_cancel): its wrapper may have exited while a child
    that ignores SIGTERM still holds its GPUs until the grace period's SIGKILL.

    `freed` in the result says that runs ended here (their CPU slots and GPUs are free again):
    the caller asks for one
    scheduler pass for all of them (the poll task runs it at once, see tasks.poll_host).
    """
    host = Host.objects.filter(pk=host_id).first()
    if host is None or (
        not host.enabled and not host.runs.filter(status__in=list(ACTIVE)).exists()
    ):
        return {"runs": 0}
    if host.kind == HostKind.SSH and not host.host_key_fingerprint:
        return {"runs": 0, "error": "host key not pinned yet: a probe pins it"}
    runs = list(Run.objects.filter(host=host, status__in=list(ACTIVE)))
    refs = [
        RunRef(
            r.id,
            host.run_root,
            log_offset=r.log_size - r.log_base,
            metrics_offset=r.metrics_offset,
            dir_name=run_dir_name(r),
            job_id=r.slurm_job_id,
        )
        for r in runs
    ]
    remote_gpus = host.kind == HostKind.SSH
    executor = None
    try:
        executor = executor_for(host)
        reports, gpu_report = executor.poll(refs, gpu=remote_gpus)
    except HostKeyMismatch as exc:
        host_key_mismatch(host, exc)
        return {"runs": len(runs), "error": str(exc)}
    except (TransportError, ProtocolError) as exc:
        host_unreachable(host, runs, str(exc))
        return {"runs": len(runs), "error": str(exc)}
    finally:
        if isinstance(executor, SlurmExecutor):
            slurm_pacing.record_calls(host.pk, executor.calls)
    # Either way the inventory marks the host online and seen.
    if gpu_report is not None:
        inventory_from_report(host, gpu_report)
    elif host.kind == HostKind.LOCAL:
        inventory_refresh_local()
    else:
        host_mark_seen(host=host)
    _confirm_gpu_placement(host)
    reported = [(run, reports[run.id]) for run in runs if run.id in reports]
    # Every run's new output in a fixed number of queries, before any of them may end.
    complete = copy_outputs(reported)
    host_answered([run for run, _ in reported])
    freed = False
    # What Slurm says changed since the last poll (a state, a job gone): its pace resets.
    changed = any(
        (report.slurm.state if report.slurm else "") != run.slurm_state for run, report in reported
    )
    for run, report in reported:
        done, was_cancelled = run.id in complete, run.id in cancelled
        if host.kind == HostKind.SLURM:
            freed |= bool(slurm.apply(run, report, complete=done, cancelled=was_cancelled))
        else:
            freed |= _apply(run, report, complete=done, cancelled=was_cancelled)
    if host.kind == HostKind.SLURM:
        slurm_pacing.polled(host.pk, changed=changed or freed)
    # One pass for everything this poll saw end, not one per run: the pass places them all.
    # (Kicking from run_transition per released lease was tried: the burst bench went from
    # ~700 passes / 17 ms per run to 1,050 passes / 34 ms per run.)
    return {"runs": len(runs), "freed": freed}


def _confirm_gpu_placement(host: Host) -> None:
    """A run seen on a GPU it leased is confirmed (an event, once per attempt); a run seen on a
    GPU it did not lease is raised as an alert (once)."""
    in_use = [
        gpu
        for gpu in host.gpus.filter(present=True)
        if any(proc.get("run_id") for proc in gpu.processes)
    ]
    if not in_use:
        return  # no run's process on any GPU: nothing to confirm, one query
    leased = set(
        GpuLease.objects.filter(released_at__isnull=True, gpu__host=host).values_list(
            "gpu_id", "run_id"
        )
    )
    seen: dict[str, str] = {}
    for gpu in in_use:
        for proc in gpu.processes:
            run_id = proc.get("run_id")
            if run_id and (gpu.id, run_id) in leased:
                seen.setdefault(run_id, f"GPU {gpu.index} of {host.name} (pid {proc.get('pid')})")
            elif run_id:
                message = (
                    f"Run {run_id} is using GPU {gpu.index} of {host.name} "
                    f"(pid {proc.get('pid')}), which it did not lease: it may have ignored "
                    "CUDA_VISIBLE_DEVICES."
                )
                # Told once per process and GPU, even once answered: every poll sees it again.
                services.alert_raise(
                    message=message,
                    run=Run.objects.filter(pk=run_id).first(),
                    choices=["acknowledge", "stop"],
                    dedupe_key=f"gpu-unleased:{run_id}:{host.name}:{gpu.index}:{proc.get('pid')}",
                    once=True,
                )
    if seen:
        services.run_gpus_confirm(seen=seen)


def _apply(run: Run, report: RunReport, *, complete: bool, cancelled: bool = False) -> bool:
    """Bring the run in line with the host's report; True when it left the host (GPUs freed).

    `complete`: the server has the run's whole log (copy_outputs), so it may end now."""
    if report.state == "running":
        if run.status == RunStatus.LAUNCHING:
            services.run_transition(
                run_id=run.id,
                to=RunStatus.RUNNING,
                from_=[RunStatus.LAUNCHING],
                actor=SYSTEM,
                message=f"found running (pid {report.pid})",
                fields={"pid": report.pid},
                expect={"attempt": run.attempt},
            )
        return False
    if report.state in ("starting", "missing"):
        if run.status == RunStatus.LAUNCHING:
            if run.stop_requested_at is not None:
                jobs.cancel_later(run.id)  # never start it
            elif _dispatch_overdue(run):
                # The dispatch was lost (worker killed, broker restarted): send it again.
                jobs.dispatch_later(run.id)
            return False
        if report.state == "missing":
            return end_run(
                run, RunStatus.FAILED, RunReason.LOST, "the run directory is gone from the host"
            )
        return False
    if not complete:
        return False  # finish copying the log first, so an ended run keeps its whole output
    if run.stop_requested_at is not None and not cancelled:
        return False  # running, with stop_requested, until the cancel confirms it is gone
    if report.state == "exited":
        code = report.exit_code
        if run.stop_requested_at is not None:
            return end_run(
                run, RunStatus.STOPPED, RunReason.USER_STOP, f"stopped (exit code {code})", code
            )
        if code == 0:
            return end_run(run, RunStatus.FINISHED, "", "exit code 0", code)
        return end_failed(run, code)
    if report.state == "vanished":
        if run.stop_requested_at is not None:
            return end_run(run, RunStatus.STOPPED, RunReason.USER_STOP, "stopped", None)
        return end_run(
            run,
            RunStatus.FAILED,
            RunReason.LOST,
            "the process vanished without an exit code (host reboot, OOM killer?)",
            None,
        )
    return False


# A launching run that its host does not show yet is usually a dispatch still on its way (a
# poll right after placement): resending it then only costs an SSH round trip (28 % more
# dispatches in the burst bench). One still missing after this long was lost.
DISPATCH_RESEND_AFTER = timedelta(seconds=10)


def _dispatch_overdue(run: Run) -> bool:
    return run.launched_at is None or timezone.now() - run.launched_at > DISPATCH_RESEND_AFTER
