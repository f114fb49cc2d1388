"""Runs on hosts: dispatch, poll, cancel, reconcile (placement is experiments.scheduler).

The database is the truth for intent, the host for processes. Every status change goes
through services.run_transition; no lock or transaction is held while a host is talked to.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from clusters.choices import HostKind, HostState
from clusters.executors import (
    HostKeyMismatch,
    LaunchSpec,
    ProtocolError,
    RunRef,
    RunReport,
    TransportError,
    executor_for,
)
from clusters.models import Host
from clusters.services import (
    inventory_from_report,
    inventory_refresh_local,
)
from experiments import services
from experiments.actors import Actor
from experiments.choices import ACTIVE, RunReason, RunStatus
from experiments.models import Alert, GpuLease, Metric, Run

log = logging.getLogger(__name__)
SYSTEM = Actor.system()
OOM_MARKERS = (b"CUDA out of memory", b"torch.OutOfMemoryError", b"CUDA_ERROR_OUT_OF_MEMORY")
BUSY_MARKERS = (
    b"all CUDA-capable devices are busy or unavailable",
    b"CUDA_ERROR_DEVICE_UNAVAILABLE",
)
MAX_BUSY_REQUEUES = 2


def log_path(run_id: str) -> Path:
    return Path(settings.DATA_DIR) / "logs" / f"{run_id}.log"


# --- dispatch ----------------------------------------------------------------------------


def run_dir_name(run: Run) -> str:
    return run.id if run.attempt <= 1 else f"{run.id}-a{run.attempt}"


def launch_spec(run: Run, host: Host) -> LaunchSpec:
    leases = GpuLease.objects.filter(run=run, released_at__isnull=True).select_related("gpu")
    indices = sorted(lease.gpu.index for lease in leases)
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


def run_dispatch(run_id: str) -> None:
    """Start a launching run on its host; safe to run twice (the host keeps the first start)."""
    run = Run.objects.select_related("host").filter(pk=run_id).first()
    if run is None or run.status != RunStatus.LAUNCHING or run.host is None:
        return
    if run.stop_requested_at is not None:
        # Stopped before it started: the cancel (which leaves a marker no later launch passes)
        # ends it. A dispatch sent before the stop, or resent by a poll, must not start it.
        return
    Run.objects.filter(pk=run_id).update(dispatch_attempts=F("dispatch_attempts") + 1)
    try:
        pid = executor_for(run.host).launch(launch_spec(run, run.host))
    except HostKeyMismatch as exc:
        _host_key_mismatch(run.host, exc)
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
            services.scheduler_kick(cpu=False)  # its GPUs are free again: the next run, now
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
            services.scheduler_kick(cpu=False)
        return
    services.run_transition(
        run_id=run_id,
        to=RunStatus.RUNNING,
        from_=[RunStatus.LAUNCHING],
        actor=SYSTEM,
        message=f"pid {pid} on {run.host.name}",
        fields={"pid": pid},
    )


# --- polling -----------------------------------------------------------------------------


def host_poll(host_id: int, *, cancelled: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One round trip to the host for all its active runs and its GPUs; the database follows.

    A run whose stop was asked for ends only once its cancel confirmed that nothing of it is
    left on the host (`cancelled`, from run_cancel): its wrapper may have exited while a child
    that ignores SIGTERM still holds its GPUs until the grace period's SIGKILL.

    `freed` in the result says that runs ended here and released GPUs: the caller asks for one
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
        )
        for r in runs
    ]
    remote_gpus = host.kind == HostKind.SSH
    try:
        reports, gpu_report = executor_for(host).poll(refs, gpu=remote_gpus)
    except HostKeyMismatch as exc:
        _host_key_mismatch(host, exc)
        return {"runs": len(runs), "error": str(exc)}
    except (TransportError, ProtocolError) as exc:
        _host_unreachable(host, runs, str(exc))
        return {"runs": len(runs), "error": str(exc)}
    # Either way the inventory marks the host online and seen.
    if gpu_report is not None:
        inventory_from_report(host, gpu_report)
    elif host.kind == HostKind.LOCAL:
        inventory_refresh_local()
    else:
        Host.objects.filter(pk=host.pk).update(state=HostState.ONLINE, last_seen_at=timezone.now())
    _confirm_gpu_placement(host)
    freed = False
    for run in runs:
        report = reports.get(run.id)
        if report is not None:
            freed |= _apply(run, report, cancelled=run.id in cancelled)
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
                if not Alert.objects.filter(run_id=run_id, message=message).exists():
                    run = Run.objects.filter(pk=run_id).first()
                    services.alert_raise(message=message, run=run, choices=["acknowledge", "stop"])
    if seen:
        services.run_gpus_confirm(seen=seen)


def _apply(run: Run, report: RunReport, *, cancelled: bool = False) -> bool:
    """Bring the run in line with the host's report; True when it left the host (GPUs freed)."""
    complete = _copy_output(run, report)
    if run.reason == RunReason.HOST_UNREACHABLE:
        Run.objects.filter(pk=run.pk, reason=RunReason.HOST_UNREACHABLE).update(reason="")
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
                services.enqueue("experiments.tasks.cancel_run", run.id)  # never start it
            elif _dispatch_overdue(run):
                # The dispatch was lost (worker killed, broker restarted): send it again.
                services.enqueue("experiments.tasks.dispatch_run", run.id)
            return False
        if report.state == "missing":
            return _end(
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
            return _end(
                run, RunStatus.STOPPED, RunReason.USER_STOP, f"stopped (exit code {code})", code
            )
        if code == 0:
            return _end(run, RunStatus.FINISHED, "", "exit code 0", code)
        return _end_failed(run, code)
    if report.state == "vanished":
        if run.stop_requested_at is not None:
            return _end(run, RunStatus.STOPPED, RunReason.USER_STOP, "stopped", None)
        return _end(
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


def _tail(run_id: str, size: int) -> bytes:
    """The end of this attempt's output (at most 64 KiB)."""
    path = log_path(run_id)
    size = min(size, 64 * 1024)
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read(size)
    except OSError:
        return b""


def _end_failed(run: Run, code: int | None) -> bool:
    """A real CUDA out-of-memory is the run's failure (cuda_oom); "all CUDA-capable devices are
    busy" means its GPU was taken meanwhile: back to the queue, at most MAX_BUSY_REQUEUES times."""
    tail = _tail(run.id, run.log_size - run.log_base)
    if any(marker in tail for marker in OOM_MARKERS):
        return _end(
            run,
            RunStatus.FAILED,
            RunReason.CUDA_OOM,
            f"CUDA out of memory (exit code {code})",
            code,
        )
    if any(marker in tail for marker in BUSY_MARKERS) and run.attempt <= MAX_BUSY_REQUEUES:
        return services.run_transition(
            run_id=run.id,
            to=RunStatus.QUEUED,
            from_=[RunStatus.RUNNING],
            actor=SYSTEM,
            reason="gpu_busy_requeue",
            message=f"its GPU was taken meanwhile (all CUDA-capable devices busy); back to the "
            f"queue, attempt {run.attempt + 1} of {MAX_BUSY_REQUEUES + 1}",
            fields={
                "attempt": run.attempt + 1,
                "log_base": run.log_size,
                "metrics_offset": 0,
                "pid": None,
                "exit_code": None,
                **({} if run.host_pinned else {"host_id": None}),
            },
            expect={"attempt": run.attempt},
        )
    return _end(run, RunStatus.FAILED, RunReason.EXIT_CODE, f"exit code {code}", code)


def _end(run: Run, to: str, reason: str, message: str, code: int | None = None) -> bool:
    return services.run_transition(
        run_id=run.id,
        to=to,
        from_=list(ACTIVE),
        actor=SYSTEM,
        reason=reason,
        message=message,
        fields={"exit_code": code, "error": message if to == RunStatus.FAILED else ""},
        expect={"attempt": run.attempt},
    )


def _copy_output(run: Run, report: RunReport) -> bool:
    """Append new log bytes and ingest metric lines; True when the server has the whole log."""
    updates: dict[str, Any] = {}
    if report.log_chunk and report.log_offset == run.log_size - run.log_base:
        path = log_path(run.id)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Logs may hold whatever a run printed (tokens too): the server's alone, 0600 in 0700.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.truncate(run.log_size)  # a copy cut short by a crash is redone from the offset
            f.write(report.log_chunk)
        run.log_size += len(report.log_chunk)
        updates["log_size"] = run.log_size
    if report.metrics_lines or report.metrics_offset != run.metrics_offset:
        latest = dict(run.metrics_latest)
        rows = _metric_rows(run, report.metrics_lines, latest)
        with transaction.atomic():
            # The offset moves only with the rows it covers: a retried poll re-reads, not skips.
            if Run.objects.filter(pk=run.pk, metrics_offset=run.metrics_offset).update(
                metrics_offset=report.metrics_offset, metrics_latest=latest
            ):
                Metric.objects.bulk_create(rows)
                run.metrics_offset, run.metrics_latest = report.metrics_offset, latest
    if updates:
        Run.objects.filter(pk=run.pk).update(**updates)
    return run.log_size - run.log_base >= report.log_size


def _metric_rows(run: Run, lines: list[str], latest: dict[str, Any]) -> list[Metric]:
    rows = []
    seq = Metric.objects.filter(run=run).count()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step")
        step = int(step) if isinstance(step, int | float) and not isinstance(step, bool) else None
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            rows.append(Metric(run=run, key=str(key)[:200], step=step, value=float(value), seq=seq))
            seq += 1
            latest[str(key)[:200]] = {"step": step, "value": float(value)}
    return rows


def _host_unreachable(host: Host, runs: list[Run], error: str) -> None:
    """A transport error fails nothing: runs stay running, flagged, until the host answers."""
    Host.objects.filter(pk=host.pk).exclude(state=HostState.KEY_MISMATCH).update(
        state=HostState.OFFLINE, state_note=error[:500]
    )
    Run.objects.filter(pk__in=[r.pk for r in runs], reason="").update(
        reason=RunReason.HOST_UNREACHABLE
    )


def _host_key_mismatch(host: Host, exc: HostKeyMismatch) -> None:
    """Refuse the host: nothing is sent to it until an admin accepts the new key."""
    changed = (
        Host.objects.filter(pk=host.pk)
        .exclude(state=HostState.KEY_MISMATCH)
        .update(
            state=HostState.KEY_MISMATCH,
            state_note=str(exc)[:500],
            facts={**host.facts, "presented_fingerprint": exc.got},
        )
    )
    if changed:
        _host_key_mismatch_alert(host, exc)


def _host_key_mismatch_alert(host: Host, exc: HostKeyMismatch) -> None:
    if not Alert.objects.filter(
        status="open", message__startswith=f"Host {host.name} presented"
    ).exists():
        services.alert_raise(
            message=f"Host {host.name} presented a different SSH host key ({exc.got}, pinned "
            f"{exc.expected}). Nothing is sent to it until an admin accepts the new key.",
            severity="critical",
            choices=["acknowledge"],
        )


# --- cancel and reconcile ----------------------------------------------------------------


def run_cancel(run_id: str) -> None:
    """Stop a launching or running run on its host, then record `stopped`."""
    run = Run.objects.select_related("host").filter(pk=run_id).first()
    if run is None or run.status not in ACTIVE or run.host is None:
        return
    try:
        left = executor_for(run.host).cancel(
            run_id=run.id,
            run_root=run.host.run_root,
            dir_name=run_dir_name(run),
            grace_seconds=settings.LABSITE["STOP_GRACE_SECONDS"],
        )
    except TransportError as exc:
        log.warning("cancel of %s: %s (retried by the reconcile pass)", run_id, exc)
        return
    if left:
        log.error("cancel of %s left %d process(es) on %s", run_id, left, run.host.name)
        return
    # Nothing of it is left: copy the last output and record the end (with its exit code).
    freed = bool(host_poll(run.host.pk, cancelled=frozenset([run.id])).get("freed"))
    freed |= services.run_transition(
        run_id=run_id,
        to=RunStatus.STOPPED,
        from_=list(ACTIVE),
        actor=SYSTEM,
        reason=RunReason.USER_STOP,
        message="stopped on the host",
    )
    if freed:
        services.scheduler_kick(cpu=False)


def hosts_with_active_runs() -> list[int]:
    return list(
        Run.objects.filter(status__in=list(ACTIVE), host__isnull=False)
        .order_by()  # the model's ordering would make DISTINCT return one row per run
        .values_list("host_id", flat=True)
        .distinct()
    )


def hosts_to_poll() -> list[int]:
    """Every enabled host (runs and GPUs) and any disabled one that still has active runs."""
    enabled = Host.objects.filter(enabled=True, kind__in=[HostKind.LOCAL, HostKind.SSH])
    return sorted(set(enabled.values_list("id", flat=True)) | set(hosts_with_active_runs()))


def reconcile() -> dict[str, int]:
    """Bring every launching/running run in line with its host; retry lost cancels."""
    counts: dict[str, int] = defaultdict(int)
    for host_id in hosts_with_active_runs():
        # Through the task, so the per-host lock keeps polls of one host from overlapping.
        services.enqueue("experiments.tasks.poll_host", host_id)
        counts["hosts"] += 1
    for run_id in Run.objects.filter(
        status__in=list(ACTIVE), stop_requested_at__isnull=False
    ).values_list("id", flat=True):
        services.enqueue("experiments.tasks.cancel_run", run_id)
        counts["cancels"] += 1
    return dict(counts)


def host_probe(host_id: int) -> str:
    """Probe a host (pin or check its key); a changed key raises an alert for the admins."""
    from clusters.services import host_probe as probe

    host, outcome = probe(host_id)
    if outcome == HostState.KEY_MISMATCH:
        _host_key_mismatch_alert(
            host,
            HostKeyMismatch(
                host.name, host.host_key_fingerprint, host.facts.get("presented_fingerprint", "?")
            ),
        )
    return outcome
