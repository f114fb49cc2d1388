"""Runs on hosts: place queued runs, dispatch, poll, cancel, reconcile.

The database is the truth for intent, the host for processes. Every status change goes
through services.run_transition; no lock or transaction is held while a host is talked to.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from clusters.choices import HostKind, HostState
from clusters.executors import (
    LaunchSpec,
    ProtocolError,
    RunRef,
    RunReport,
    TransportError,
    executor_for,
)
from clusters.models import Gpu, Host
from clusters.services import LOCAL_HOST_NAME, gpu_policy_for
from clusters.ssh import HostKeyMismatch
from experiments import services
from experiments.actors import Actor
from experiments.choices import ACTIVE, RunReason, RunStatus
from experiments.models import Alert, GpuLease, Metric, Run

log = logging.getLogger(__name__)
SYSTEM = Actor.system()
OOM_MARKERS = (b"CUDA out of memory", b"torch.OutOfMemoryError", b"CUDA_ERROR_OUT_OF_MEMORY")


def log_path(run_id: str) -> Path:
    return Path(settings.DATA_DIR) / "logs" / f"{run_id}.log"


# --- placement ---------------------------------------------------------------------------


def _free_gpus(host: Host) -> list[Gpu]:
    """GPUs of the host that pass its policy and carry no active lease."""
    policy = gpu_policy_for(host)
    leased = set(
        GpuLease.objects.filter(released_at__isnull=True, gpu__host=host).values_list(
            "gpu_id", flat=True
        )
    )
    return [
        g
        for g in host.gpus.filter(present=True).order_by("index")
        if g.id not in leased
        and not g.processes
        and g.memory_used_mb <= policy.max_memory_used_mb
        and g.utilization_pct <= policy.max_utilization_pct
    ]


def _target_host(run: Run) -> Host | None:
    if run.host_id:
        return run.host if run.host and run.host.enabled else None
    return Host.objects.filter(name=LOCAL_HOST_NAME, enabled=True).first()


def run_place(run: Run) -> bool:
    """Lease GPUs and move queued -> launching in ONE transaction; False leaves it queued."""
    host = _target_host(run)
    if host is None:
        _wait(run, "its host is disabled or unknown" if run.host_id else "no enabled host")
        return False
    gpus: list[Gpu] = []
    if run.gpus:
        free = _free_gpus(host)
        need_mb = math.ceil(1.2 * run.min_free_mem_mb) if run.min_free_mem_mb else 0
        free = [g for g in free if g.memory_free_mb >= need_mb]
        if len(free) < run.gpus:
            mem = f" with {run.min_free_mem_mb} MB free" if run.min_free_mem_mb else ""
            _wait(run, f"needs {run.gpus} GPU(s){mem}; {len(free)} free on {host.name}")
            return False
        gpus = free[: run.gpus]
    try:
        with transaction.atomic():
            for gpu in gpus:
                GpuLease.objects.create(gpu=gpu, run=run)
            moved = services.run_transition(
                run_id=run.id,
                to=RunStatus.LAUNCHING,
                from_=[RunStatus.QUEUED],
                actor=SYSTEM,
                message=f"placed on {host.name}"
                + (f" GPUs {[g.index for g in gpus]}" if gpus else ""),
                fields={"host_id": host.id, "waiting_reason": "", "dispatch_attempts": 0},
            )
            if not moved:
                raise _Lost()
            transaction.on_commit(
                lambda: services._enqueue("experiments.tasks.dispatch_run", run.id)
            )
    except (IntegrityError, _Lost):
        return False  # another pass leased a GPU or moved the run first
    return True


class _Lost(Exception):
    pass


def _wait(run: Run, reason: str) -> None:
    if run.waiting_reason != reason:
        Run.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(waiting_reason=reason)


def schedule_pass(limit: int = 500) -> int:
    """Place queued runs by priority then age; returns how many were placed."""
    placed = 0
    queued = (
        Run.objects.filter(status=RunStatus.QUEUED)
        .select_related("host")
        .order_by("-priority", "queued_at", "id")[:limit]
    )
    for run in queued:
        placed += run_place(run)
    return placed


# --- dispatch ----------------------------------------------------------------------------


def launch_spec(run: Run, host: Host) -> LaunchSpec:
    leases = GpuLease.objects.filter(run=run, released_at__isnull=True).select_related("gpu")
    indices = sorted(lease.gpu.index for lease in leases)
    wrap = run.gpuwrap_config or {}
    pin = bool(indices) or (wrap.get("enabled") and host.kind != HostKind.SLURM)
    return LaunchSpec(
        run_id=run.id,
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
        services.run_transition(
            run_id=run_id,
            to=RunStatus.FAILED,
            from_=[RunStatus.LAUNCHING],
            actor=SYSTEM,
            reason=RunReason.LAUNCH_ERROR,
            message=str(exc),
            fields={"error": str(exc)[:2000]},
        )
        return
    if pid is None:
        services.run_transition(
            run_id=run_id,
            to=RunStatus.STOPPED,
            from_=[RunStatus.LAUNCHING],
            actor=SYSTEM,
            reason=RunReason.USER_STOP,
            message="cancelled before it started",
        )
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


def host_poll(host_id: int) -> dict[str, Any]:
    """One round trip to the host for all its active runs; the database follows what it says."""
    host = Host.objects.filter(pk=host_id).first()
    if host is None:
        return {"runs": 0}
    runs = list(Run.objects.filter(host=host, status__in=list(ACTIVE)))
    if not runs:
        return {"runs": 0}
    refs = [
        RunRef(r.id, host.run_root, log_offset=r.log_size, metrics_offset=r.metrics_offset)
        for r in runs
    ]
    try:
        reports = executor_for(host).poll(refs)
    except HostKeyMismatch as exc:
        _host_key_mismatch(host, exc)
        return {"runs": len(runs), "error": str(exc)}
    except (TransportError, ProtocolError) as exc:
        _host_unreachable(host, runs, str(exc))
        return {"runs": len(runs), "error": str(exc)}
    now = timezone.now()
    Host.objects.filter(pk=host.pk).update(state=HostState.ONLINE, last_seen_at=now)
    for run in runs:
        report = reports.get(run.id)
        if report is not None:
            _apply(run, report)
    return {"runs": len(runs)}


def _apply(run: Run, report: RunReport) -> None:
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
            )
        return
    if report.state in ("starting", "missing"):
        if run.status == RunStatus.LAUNCHING:
            # The dispatch was lost (worker killed, broker restarted): send it again.
            services._enqueue("experiments.tasks.dispatch_run", run.id)
        elif report.state == "missing":
            _end(run, RunStatus.FAILED, RunReason.LOST, "the run directory is gone from the host")
        return
    if not complete:
        return  # finish copying the log first, so an ended run keeps its whole output
    if report.state == "exited":
        code = report.exit_code
        if run.stop_requested_at is not None:
            _end(run, RunStatus.STOPPED, RunReason.USER_STOP, f"stopped (exit code {code})", code)
        elif code == 0:
            _end(run, RunStatus.FINISHED, "", "exit code 0", code)
            services.scheduler_kick()
        else:
            _end_failed(run, code)
    elif report.state == "vanished":
        if run.stop_requested_at is not None:
            _end(run, RunStatus.STOPPED, RunReason.USER_STOP, "stopped", None)
        else:
            _end(
                run,
                RunStatus.FAILED,
                RunReason.LOST,
                "the process vanished without an exit code (host reboot, OOM killer?)",
                None,
            )


def _tail(run_id: str, size: int = 64 * 1024) -> bytes:
    path = log_path(run_id)
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read()
    except OSError:
        return b""


def _end_failed(run: Run, code: int | None) -> None:
    """A real CUDA out-of-memory is the run's failure (cuda_oom), not contention."""
    if any(marker in _tail(run.id) for marker in OOM_MARKERS):
        _end(
            run,
            RunStatus.FAILED,
            RunReason.CUDA_OOM,
            f"CUDA out of memory (exit code {code})",
            code,
        )
    else:
        _end(run, RunStatus.FAILED, RunReason.EXIT_CODE, f"exit code {code}", code)
    services.scheduler_kick()


def _end(run: Run, to: str, reason: str, message: str, code: int | None = None) -> None:
    services.run_transition(
        run_id=run.id,
        to=to,
        from_=list(ACTIVE),
        actor=SYSTEM,
        reason=reason,
        message=message,
        fields={"exit_code": code, "error": message if to == RunStatus.FAILED else ""},
    )


def _copy_output(run: Run, report: RunReport) -> bool:
    """Append new log bytes and ingest metric lines; True when the server has the whole log."""
    updates: dict[str, Any] = {}
    if report.log_chunk and report.log_offset == run.log_size:
        path = log_path(run.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
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
    return run.log_size >= report.log_size


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
            grace_seconds=settings.LABSITE["STOP_GRACE_SECONDS"],
        )
    except TransportError as exc:
        log.warning("cancel of %s: %s (retried by the reconcile pass)", run_id, exc)
        return
    if left:
        log.error("cancel of %s left %d process(es) on %s", run_id, left, run.host.name)
        return
    host_poll(run.host.pk)  # copy the last output, then record the end
    services.run_transition(
        run_id=run_id,
        to=RunStatus.STOPPED,
        from_=list(ACTIVE),
        actor=SYSTEM,
        reason=RunReason.USER_STOP,
        message="stopped on the host",
    )


def hosts_with_active_runs() -> list[int]:
    return list(
        Run.objects.filter(status__in=list(ACTIVE), host__isnull=False)
        .order_by()  # the model's ordering would make DISTINCT return one row per run
        .values_list("host_id", flat=True)
        .distinct()
    )


def reconcile() -> dict[str, int]:
    """Bring every launching/running run in line with its host; retry lost cancels."""
    counts: dict[str, int] = defaultdict(int)
    for host_id in hosts_with_active_runs():
        host_poll(host_id)
        counts["hosts"] += 1
    for run_id in Run.objects.filter(
        status__in=list(ACTIVE), stop_requested_at__isnull=False
    ).values_list("id", flat=True):
        services._enqueue("experiments.tasks.cancel_run", run_id)
        counts["cancels"] += 1
    return dict(counts)


def host_probe(host_id: int) -> str:
    """Probe a host (pin or check its key); a changed key raises an alert for the admins."""
    from clusters.services import host_probe as probe

    host, outcome = probe(host_id)
    if outcome == HostState.KEY_MISMATCH:
        from clusters.ssh import HostKeyMismatch as Mismatch

        _host_key_mismatch_alert(
            host,
            Mismatch(
                host.name, host.host_key_fingerprint, host.facts.get("presented_fingerprint", "?")
            ),
        )
    return outcome
