"""Runs: the one way a status changes (run_transition, runs_transition), creation, start, stop,
rerun.

A run's `status` changes only here, by a conditional UPDATE with a RunEvent in the same
transaction. A few fields change elsewhere, by design, as bookkeeping that never decides a
state (see the comments on experiments.models.Run): `waiting_reason` (the scheduler's words on
why a queued run waits, rewritten by every pass), `reason = host_unreachable` (a flag on an
active run while its host does not answer, cleared by the next answer), the output offsets, and
`dispatch_attempts` (a counter that no transition reads). A change that decides what happens
to a run goes through run_transition, with its event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from clusters.models import Host
from experiments import jobs
from experiments.actors import Actor
from experiments.capacity import PENDING_PASS
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
    lock_plan_status,
    new_run,
    require_owner,
    run_spec,
    settle_start,
    start_status,
    waiting_reason_for,
)
from labsite.errors import Conflict

# Ids per statement of a bulk transition: far under PostgreSQL's 65,535 and SQLite's 32,766
# bound parameters, and more than any one approval or pass moves in practice.
BULK_CHUNK = 5000


def _values(to: str, reason: str, fields: Mapping[str, Any] | None, now: Any) -> dict[str, Any]:
    """The columns a transition to `to` writes."""
    values: dict[str, Any] = {"status": to, "updated_at": now, STATE_TIMESTAMP[to]: now}
    if reason or to in TERMINAL:
        values["reason"] = reason
    if to == RunStatus.QUEUED:
        # A queued run says why it waits from the moment it is queued; a pass replaces this.
        values["waiting_reason"] = PENDING_PASS
    values.update(fields or {})
    return values


def _event(
    run_id: str, *, from_status: str, to_status: str, actor: Actor, reason: str, message: str
) -> RunEvent:
    return RunEvent(
        run_id=run_id,
        from_status=from_status,
        to_status=to_status,
        reason=reason,
        message=message,
        actor_kind=actor.kind,
        actor_user_id=actor.user_id,
        actor_token=actor.token,
    )


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
    values = _values(to, reason, fields, now)
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
        _event(
            run_id, from_status=current, to_status=to, actor=actor, reason=reason, message=message
        ).save()
        if to in TERMINAL or to == RunStatus.QUEUED:
            GpuLease.objects.filter(run_id=run_id, released_at__isnull=True).update(released_at=now)
    return True


def runs_transition(
    *,
    run_ids: Iterable[str],
    to: str,
    actor: Actor,
    from_: Iterable[str] | None = None,
    reason: str = "",
    message: str = "",
    fields: Mapping[str, Any] | None = None,
) -> list[str]:
    """run_transition for a set of runs, in queries that do not grow with it; the ids that moved.

    Still exactly one winner per run. The runs still in `from_` are read FOR UPDATE, in id
    order (PostgreSQL locks them until the commit, and two bulk transitions lock alike, so they
    cannot deadlock; on SQLite the transaction is BEGIN IMMEDIATE, so no other writer runs
    meanwhile); then one conditional UPDATE (`WHERE status IN from_`) moves them, their
    RunEvents are one bulk insert, and leases are released in one UPDATE where a run may hold
    any. Without RETURNING, the ids read under the lock are the ones that moved.
    """
    allowed = RUN_TRANSITIONS[to] if from_ is None else frozenset(from_) & RUN_TRANSITIONS[to]
    ids = list(dict.fromkeys(run_ids))
    if not ids or not allowed:
        return []
    now = timezone.now()
    values = _values(to, reason, fields, now)
    moved: list[tuple[str, str]] = []
    with transaction.atomic(savepoint=False):
        for start in range(0, len(ids), BULK_CHUNK):
            chunk = ids[start : start + BULK_CHUNK]
            rows = list(
                Run.objects.select_for_update()
                .filter(pk__in=chunk, status__in=allowed)
                .order_by("pk")
                .values_list("id", "status")
            )
            if not rows:
                continue
            locked = [run_id for run_id, _ in rows]
            updated = Run.objects.filter(pk__in=locked, status__in=allowed).update(**values)
            if updated != len(rows):
                # Only where nothing locked the rows (SQLite outside BEGIN IMMEDIATE): a rival
                # moved some first. Ours carry this UPDATE's stamp.
                ours = set(
                    Run.objects.filter(pk__in=locked, status=to, updated_at=now).values_list(
                        "id", flat=True
                    )
                )
                rows = [row for row in rows if row[0] in ours]
            moved += rows
        RunEvent.objects.bulk_create(
            _event(
                run_id, from_status=was, to_status=to, actor=actor, reason=reason, message=message
            )
            for run_id, was in moved
        )
        if moved and (to in TERMINAL or to == RunStatus.QUEUED) and allowed & ACTIVE:
            GpuLease.objects.filter(
                run_id__in=[run_id for run_id, _ in moved], released_at__isnull=True
            ).update(released_at=now)
    return [run_id for run_id, _ in moved]


def run_event(run: Run, *, actor: Actor, reason: str, message: str = "") -> None:
    """A decision about a run that is not a status change (it stays in its state)."""
    _event(
        run.id,
        from_status=run.status,
        to_status=run.status,
        actor=actor,
        reason=reason,
        message=message,
    ).save()


def run_gpus_confirm(*, seen: Mapping[str, str]) -> list[str]:
    """Record, once per attempt, that a host showed these runs' processes on their leased GPUs.

    `seen` maps run id -> what was seen ("GPU 0 of node-1 (pid 4242)"); returns the runs that
    got their confirmation now (the others had it, or are no longer active). Three queries
    however many runs: the confirmations already made, the runs still active, one bulk insert.
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
    system = Actor.system()
    events = [
        _event(
            run_id,
            from_status=status,
            to_status=status,
            actor=system,
            reason="gpu_confirmed",
            message=f"seen on {seen[run_id]}",
        )
        for run_id, status in Run.objects.filter(
            pk__in=pending, status__in=list(ACTIVE)
        ).values_list("id", "status")
    ]
    RunEvent.objects.bulk_create(events)
    return [event.run_id for event in events]


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
    cpus: int = 1,
    memory_mb: int | None = None,
    gpuwrap_config: Mapping[str, Any] | None = None,
    host: Host | None = None,
    slurm: Mapping[str, Any] | None = None,
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
        cpus=cpus,
        memory_mb=memory_mb,
        gpuwrap_config=gpuwrap_config,
        host=host,
        slurm=slurm,
        priority=priority,
        chat_session_id=chat_session_id,
        auto_start=auto_start,
        parent=parent,
    )
    run = new_run(spec, command=command, name=name, params=params)
    with transaction.atomic():
        # Held or queued is decided here, under the plan's row lock: an approval that runs
        # meanwhile either sees this run (and releases it) or has committed (and it is queued).
        settle_start([run], plan=effective_plan(plan=plan, sweep=sweep))
        run.save(force_insert=True)
        created_event(run, actor=actor).save()
        if kick and run.status == RunStatus.QUEUED:
            jobs.kick_scheduler(cpu=not run.gpus, gpu=bool(run.gpus))
    return run


def run_start(*, run: Run, actor: Actor) -> Run:
    """ready -> queued, or held while its plan is not approved (decided under the plan's lock,
    as at creation, so that an approval meanwhile cannot leave it held)."""
    require_owner(actor, run.created_by_id, "start this run")
    waiting = waiting_reason_for(
        gpus=run.gpus,
        min_free_mem_mb=run.min_free_mem_mb,
        cpus=run.cpus,
        memory_mb=run.memory_mb,
        host=run.host if run.host_pinned else None,
        owner=run.created_by,
    )
    with transaction.atomic():
        to = start_status(lock_plan_status(effective_plan(plan=run.plan, sweep=run.sweep)))
        held = to == RunStatus.HELD
        moved = run_transition(
            run_id=run.id,
            to=to,
            from_=[RunStatus.READY],
            actor=actor,
            reason=RunReason.PLAN_NOT_APPROVED if held else "",
            fields=None if held else {"waiting_reason": waiting},
        )
        if moved and not held:
            jobs.kick_scheduler(cpu=not run.gpus, gpu=bool(run.gpus))
    run.refresh_from_db()
    if not moved:
        raise Conflict(f"run {run.id} is {run.status}; only a ready run can be started")
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
        cpus=run.cpus,
        memory_mb=run.memory_mb,
        gpuwrap_config=run.gpuwrap_config,
        host=run.host if run.host_pinned else None,
        slurm=run.slurm or None,
        priority=run.priority,
        chat_session_id=run.chat_session_id,
        auto_start=True,
        parent=run,
    )
