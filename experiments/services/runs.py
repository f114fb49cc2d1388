"""Runs: the one way a status changes (run_transition), creation, start, stop, rerun."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from clusters.models import Host
from experiments import jobs
from experiments.actors import Actor
from experiments.choices import (
    ACTIVE,
    RUN_TRANSITIONS,
    STATE_TIMESTAMP,
    TERMINAL,
    RunReason,
    RunStatus,
)
from experiments.models import (
    GpuLease,
    Plan,
    Run,
    RunEvent,
    Sweep,
)
from experiments.services.runspec import (
    created_event,
    effective_plan,
    new_run,
    require_owner,
    run_spec,
    start_status,
)
from labsite.errors import Conflict


def run_transition(
    *,
    run_id: str,
    to: str,
    actor: Actor,
    from_: Iterable[str] | None = None,
    reason: str = "",
    message: str = "",
    fields: Mapping[str, Any] | None = None,
    expect: Mapping[str, Any] | None = None,
) -> bool:
    """Move a run to `to` if it is still in one of `from_`; True for the one caller that wins.

    `expect` adds conditions (e.g. the attempt a host report was read for), so a stale report
    cannot move a newer attempt of the run.

    A conditional UPDATE decides the race (it behaves the same on SQLite and PostgreSQL),
    and the RunEvent is written in the same transaction, so no change goes unaudited.
    """
    allowed = RUN_TRANSITIONS[to] if from_ is None else frozenset(from_) & RUN_TRANSITIONS[to]
    now = timezone.now()
    values: dict[str, Any] = {"status": to, "updated_at": now, STATE_TIMESTAMP[to]: now}
    if reason or to in TERMINAL:
        values["reason"] = reason
    values.update(fields or {})
    # No savepoint: inside a caller's transaction (placement), a failure aborts it all anyway.
    current: str | None
    with transaction.atomic(savepoint=False):
        if len(allowed) == 1:
            (current,) = allowed  # the UPDATE below is the whole check: one round trip less
        else:
            current = (
                Run.objects.filter(pk=run_id, **(expect or {}))
                .values_list("status", flat=True)
                .first()
            )
            if current is None or current not in allowed:
                return False
        if Run.objects.filter(pk=run_id, status=current, **(expect or {})).update(**values) != 1:
            return False
        RunEvent.objects.create(
            run_id=run_id,
            from_status=current,
            to_status=to,
            reason=reason,
            message=message,
            actor_kind=actor.kind,
            actor_user_id=actor.user_id,
            actor_token=actor.token,
        )
        if to in TERMINAL or to == RunStatus.QUEUED:
            GpuLease.objects.filter(run_id=run_id, released_at__isnull=True).update(released_at=now)
    return True


def run_event(run: Run, *, actor: Actor, reason: str, message: str = "") -> None:
    """A decision about a run that is not a status change (it stays in its state)."""
    RunEvent.objects.create(
        run=run,
        from_status=run.status,
        to_status=run.status,
        reason=reason,
        message=message,
        actor_kind=actor.kind,
        actor_user_id=actor.user_id,
        actor_token=actor.token,
    )


def run_gpus_confirm(*, seen: Mapping[str, str]) -> list[str]:
    """Record, once per attempt, that a host showed these runs' processes on their leased GPUs.

    `seen` maps run id -> what was seen ("GPU 0 of node-1 (pid 4242)"); returns the runs that
    got their confirmation now (the others had it, or are no longer active).
    """
    done = set(
        RunEvent.objects.filter(
            run_id__in=list(seen),
            reason="gpu_confirmed",
            created_at__gte=F("run__launched_at"),
        ).values_list("run_id", flat=True)
    )
    pending = [run_id for run_id in seen if run_id not in done]
    if not pending:
        return []
    runs = Run.objects.filter(pk__in=pending, status__in=list(ACTIVE))
    confirmed = []
    for run in runs:
        run_event(
            run, actor=Actor.system(), reason="gpu_confirmed", message=f"seen on {seen[run.id]}"
        )
        confirmed.append(run.id)
    return confirmed


def run_create(
    *,
    actor: Actor,
    command: str,
    name: str = "",
    sweep: Sweep | None = None,
    plan: Plan | None = None,
    workdir: str = "",
    env: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    gpus: int | None = None,
    min_free_mem_mb: int | None = None,
    gpuwrap_config: Mapping[str, Any] | None = None,
    host: Host | None = None,
    priority: int = 0,
    chat_session_id: str = "",
    auto_start: bool = False,
    parent: Run | None = None,
    kick: bool = True,
) -> Run:
    """A run: `queued` (`held` behind an unapproved plan) with auto_start, else `ready`.

    Linking it to a plan or sweep needs their owner, a PI or an admin (PermissionDenied)."""
    spec = run_spec(
        actor=actor,
        sweep=sweep,
        plan=plan,
        workdir=workdir,
        env=env,
        gpus=gpus,
        min_free_mem_mb=min_free_mem_mb,
        gpuwrap_config=gpuwrap_config,
        host=host,
        priority=priority,
        chat_session_id=chat_session_id,
        auto_start=auto_start,
        parent=parent,
    )
    run = new_run(spec, command=command, name=name, params=params)
    with transaction.atomic():
        run.save(force_insert=True)
        created_event(run, actor=actor).save()
        if kick and run.status == RunStatus.QUEUED:
            jobs.kick_scheduler()
    return run


def run_start(*, run: Run, actor: Actor) -> Run:
    """ready -> queued, or held while its plan is not approved."""
    require_owner(actor, run.created_by_id, "start this run")
    to = start_status(effective_plan(plan=run.plan, sweep=run.sweep))
    reason = RunReason.PLAN_NOT_APPROVED if to == RunStatus.HELD else ""
    if not run_transition(
        run_id=run.id, to=to, from_=[RunStatus.READY], actor=actor, reason=reason
    ):
        run.refresh_from_db()
        raise Conflict(f"run {run.id} is {run.status}; only a ready run can be started")
    if to == RunStatus.QUEUED:
        jobs.kick_scheduler()
    run.refresh_from_db()
    return run


def run_stop(*, run: Run, actor: Actor, reason: str = RunReason.USER_STOP) -> Run:
    """Stop a run in any non-terminal state.

    Runs not on a host yet stop at once; a launching or running run is marked and its
    process is cancelled on the host by the worker, which then records `stopped`.
    """
    require_owner(actor, run.created_by_id, "stop this run")
    waiting = [RunStatus.READY, RunStatus.HELD, RunStatus.QUEUED]
    if run_transition(
        run_id=run.id, to=RunStatus.STOPPED, from_=waiting, actor=actor, reason=reason
    ):
        run.refresh_from_db()
        return run
    run.refresh_from_db()
    if run.status in TERMINAL:
        raise Conflict(f"run {run.id} is already {run.status}")
    with transaction.atomic():
        marked = Run.objects.filter(
            pk=run.id,
            status__in=[RunStatus.LAUNCHING, RunStatus.RUNNING],
            stop_requested_at__isnull=True,
        ).update(stop_requested_at=timezone.now())
        if marked:
            run_event(run, actor=actor, reason="stop_requested", message="cancel sent to host")
            jobs.cancel_later(run.id)
    run.refresh_from_db()
    return run


def run_rerun(*, run: Run, actor: Actor) -> Run:
    """A new run with the same command and settings, linked to the original, auto-started."""
    require_owner(actor, run.created_by_id, "rerun this run")
    return run_create(
        actor=actor,
        command=run.command,
        name=run.name,
        sweep=run.sweep,
        plan=run.plan,
        workdir=run.workdir,
        env=run.env,
        params=run.params,
        gpus=run.gpus,
        min_free_mem_mb=run.min_free_mem_mb,
        gpuwrap_config=run.gpuwrap_config,
        host=run.host if run.host_pinned else None,
        priority=run.priority,
        chat_session_id=run.chat_session_id,
        auto_start=True,
        parent=run,
    )
