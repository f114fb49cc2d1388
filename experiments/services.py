"""All writes to the lab's work. Run status changes go through run_transition only."""

from __future__ import annotations

import itertools
import logging
import math
import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from clusters import localuser
from clusters.choices import HostKind
from clusters.models import Host
from experiments.actors import Actor
from experiments.choices import (
    ACTIVE,
    NON_TERMINAL,
    PLAN_ARCHIVABLE,
    PLAN_CLEARED,
    PLAN_DECIDABLE,
    PLAN_SECTIONS,
    PLAN_SUBMITTABLE,
    RUN_TRANSITIONS,
    STATE_TIMESTAMP,
    TERMINAL,
    AlertStatus,
    PlanStatus,
    RunReason,
    RunStatus,
    SweepKind,
)
from experiments.models import (
    Alert,
    GpuLease,
    Plan,
    PlanEvent,
    Run,
    RunEvent,
    Sweep,
    new_id,
)
from labsite import roles
from labsite.errors import Conflict
from labsite.validation import INT32_MAX, check_int, check_size, lab_limit

log = logging.getLogger(__name__)

GPUWRAP_KEYS = {"enabled", "retries", "retry_delay_seconds"}
MAX_RETRY_DELAY_SECONDS = 86400
MAX_GPUS_PER_RUN = 64
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What the launcher sets for a run it pinned to GPUs; the run's own env must not undo it.
GPU_PINNING_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"})


# --- runs: the one way a status changes -------------------------------------------------


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


def _event(run: Run, *, actor: Actor, reason: str, message: str = "") -> None:
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
        _event(run, actor=Actor.system(), reason="gpu_confirmed", message=f"seen on {seen[run.id]}")
        confirmed.append(run.id)
    return confirmed


def _plan_cleared(plan: Plan | None) -> bool:
    return plan is None or plan.status in PLAN_CLEARED


def _effective_plan(*, plan: Plan | None, sweep: Sweep | None) -> Plan | None:
    return plan or (sweep.plan if sweep is not None else None)


def _start_status(plan: Plan | None) -> str:
    return RunStatus.QUEUED if _plan_cleared(plan) else RunStatus.HELD


def validate_gpuwrap_config(config: Any) -> dict[str, Any]:
    """Check gpuwrap_config's keys and types; unknown keys are an error, not ignored."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValidationError({"gpuwrap_config": "must be an object"})
    unknown = sorted(set(config) - GPUWRAP_KEYS)
    if unknown:
        raise ValidationError(
            {
                "gpuwrap_config": f"unknown field(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(GPUWRAP_KEYS))}"
            }
        )
    enabled = config.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ValidationError({"gpuwrap_config": "enabled must be true or false"})
    retries = config.get("retries", -1)
    if isinstance(retries, bool) or not isinstance(retries, int) or not -1 <= retries <= INT32_MAX:
        raise ValidationError(
            {"gpuwrap_config": f"retries must be an integer from -1 to {INT32_MAX}"}
        )
    delay = config.get("retry_delay_seconds", 30)
    if (
        isinstance(delay, bool)
        or not isinstance(delay, int | float)
        or not 0 <= delay <= MAX_RETRY_DELAY_SECONDS
    ):
        raise ValidationError(
            {
                "gpuwrap_config": "retry_delay_seconds must be a number from 0 to "
                f"{MAX_RETRY_DELAY_SECONDS}"
            }
        )
    return {"enabled": enabled, "retries": retries, "retry_delay_seconds": delay}


def _check_env(env: Any, *, leases_gpus: bool) -> dict[str, str]:
    """The run's own environment: valid names, none of Labsite's, within the lab's limits."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise ValidationError({"env": "must be an object of NAME: value"})
    check_size("env", len(env), "MAX_ENV_VARS", "variables", verb="has")
    clean = {}
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):
            raise ValidationError({"env": f"{key!r} is not a valid environment variable name"})
        if key.startswith("LABSITE_"):
            raise ValidationError({"env": f"{key}: LABSITE_* variables are Labsite's own"})
        if leases_gpus and key in GPU_PINNING_ENV:
            raise ValidationError(
                {
                    "env": f"{key}: Labsite pins the GPUs of a run that leases them (gpus > 0 or "
                    "gpuwrap enabled); leave it out"
                }
            )
        if not isinstance(value, str | int | float | bool):
            raise ValidationError({"env": f"{key}: values must be strings or numbers"})
        clean[key] = str(value)
    size = sum(len(f"{key}={value}".encode()) for key, value in clean.items())
    check_size("env", size, "MAX_ENV_BYTES", "bytes")
    return clean


def _name_limit(model: type[Any]) -> int:
    column: int = model._meta.get_field("name").max_length
    return min(lab_limit("MAX_NAME_LENGTH"), column)


def _check_name(field: str, name: str, model: type[Any]) -> str:
    name = (name or "").strip()
    check_size(field, len(name), "MAX_NAME_LENGTH", "characters", most=_name_limit(model))
    return name


def _check_command(field: str, command: str) -> str:
    command = (command or "").strip()
    if not command:
        raise ValidationError({field: "must not be empty"})
    check_size(field, len(command), "MAX_COMMAND_LENGTH", "characters")
    return command


def _require_link(actor: Actor, target: Plan | Sweep | None) -> None:
    """Work goes under a plan or sweep only by its owner, a PI or an admin: a member borrowing
    another's approved plan would skip review and spend that plan's GPU-hour budget."""
    if target is None:
        return
    owner_id = target.author_id if isinstance(target, Plan) else target.created_by_id
    if not roles.can_act_on(actor.user, owner_id):
        what = "plan" if isinstance(target, Plan) else "sweep"
        raise PermissionDenied(
            f"{what} {target.pk} is not yours: only its owner, a PI or an admin may add work to it"
        )


def _run_spec(
    *,
    actor: Actor,
    sweep: Sweep | None,
    plan: Plan | None,
    workdir: str,
    env: Mapping[str, Any] | None,
    gpus: int | None,
    min_free_mem_mb: int | None,
    gpuwrap_config: Mapping[str, Any] | None,
    host: Host | None,
    priority: int,
    chat_session_id: str,
    auto_start: bool,
    parent: Run | None,
) -> dict[str, Any]:
    """The checked fields that runs created together share (one run, or a grid's runs)."""
    wrap = validate_gpuwrap_config(gpuwrap_config)
    if gpus is None:
        gpus = 1 if wrap.get("enabled") else 0
    check_int("gpus", gpus, minimum=0, maximum=MAX_GPUS_PER_RUN)
    check_int("min_free_mem_mb", min_free_mem_mb, minimum=0)
    check_int("priority", priority, minimum=-INT32_MAX)
    if host is not None and not host.enabled:
        raise ValidationError({"host": f"host {host.name} is disabled"})
    if (
        host is not None
        and host.kind == HostKind.LOCAL
        and not localuser.members_may_run_locally()
        and not roles.is_admin(actor.user)
    ):
        raise ValidationError({"host": localuser.admins_only_reason()})
    clean_env = _check_env(env, leases_gpus=gpus > 0 or bool(wrap.get("enabled")))
    effective_plan = _effective_plan(plan=plan, sweep=sweep)
    for target in {id(t): t for t in (sweep, plan, effective_plan) if t is not None}.values():
        _require_link(actor, target)
    _check_plan_link(effective_plan)
    if settings.LABSITE["REQUIRE_PLAN_FOR_GPU_WORK"] and gpus > 0 and effective_plan is None:
        raise ValidationError(
            {"plan_id": "this lab requires a plan for GPU work: create one and pass plan_id"}
        )
    status = _start_status(effective_plan) if auto_start else RunStatus.READY
    return {
        "workdir": workdir or "",
        "env": clean_env,
        "sweep": sweep,
        "plan": plan,
        "status": status,
        "reason": RunReason.PLAN_NOT_APPROVED if status == RunStatus.HELD else "",
        "priority": priority,
        "gpus": gpus,
        "min_free_mem_mb": min_free_mem_mb,
        "gpuwrap_config": wrap,
        "host": host,
        "host_pinned": host is not None,
        "chat_session_id": chat_session_id or (sweep.chat_session_id if sweep else ""),
        "created_by": actor.user,
        "parent": parent,
        **({STATE_TIMESTAMP[status]: timezone.now()} if status in STATE_TIMESTAMP else {}),
    }


def _new_run(
    spec: Mapping[str, Any],
    *,
    command: str,
    name: str,
    params: Mapping[str, Any] | None,
    run_id: str | None = None,
) -> Run:
    """An unsaved run from a spec; the command and name are checked here, per run."""
    command = _check_command("command", command)
    name = _check_name("name", name, Run) or command.split()[0][: _name_limit(Run)]
    run = Run(**spec, command=command, name=name, params=dict(params or {}))
    if run_id is not None:
        run.id = run_id
    return run


def _created_event(run: Run, *, actor: Actor) -> RunEvent:
    return RunEvent(
        run=run,
        from_status="",
        to_status=run.status,
        reason="rerun" if run.parent_id else "created",
        message=f"rerun of {run.parent_id}" if run.parent_id else "",
        actor_kind=actor.kind,
        actor_user_id=actor.user_id,
        actor_token=actor.token,
    )


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
    spec = _run_spec(
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
    run = _new_run(spec, command=command, name=name, params=params)
    with transaction.atomic():
        run.save(force_insert=True)
        _created_event(run, actor=actor).save()
        if kick and run.status == RunStatus.QUEUED:
            scheduler_kick()
    return run


def _require_owner(actor: Actor, owner_id: int | None, what: str) -> None:
    if not roles.can_act_on(actor.user, owner_id):
        raise PermissionDenied(f"only its owner, a PI or an admin may {what}")


def run_start(*, run: Run, actor: Actor) -> Run:
    """ready -> queued, or held while its plan is not approved."""
    _require_owner(actor, run.created_by_id, "start this run")
    to = _start_status(_effective_plan(plan=run.plan, sweep=run.sweep))
    reason = RunReason.PLAN_NOT_APPROVED if to == RunStatus.HELD else ""
    if not run_transition(
        run_id=run.id, to=to, from_=[RunStatus.READY], actor=actor, reason=reason
    ):
        run.refresh_from_db()
        raise Conflict(f"run {run.id} is {run.status}; only a ready run can be started")
    if to == RunStatus.QUEUED:
        scheduler_kick()
    run.refresh_from_db()
    return run


def run_stop(*, run: Run, actor: Actor, reason: str = RunReason.USER_STOP) -> Run:
    """Stop a run in any non-terminal state.

    Runs not on a host yet stop at once; a launching or running run is marked and its
    process is cancelled on the host by the worker, which then records `stopped`.
    """
    _require_owner(actor, run.created_by_id, "stop this run")
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
            _event(run, actor=actor, reason="stop_requested", message="cancel sent to host")
            transaction.on_commit(lambda: enqueue("experiments.tasks.cancel_run", run.id))
    run.refresh_from_db()
    return run


def run_rerun(*, run: Run, actor: Actor) -> Run:
    """A new run with the same command and settings, linked to the original, auto-started."""
    _require_owner(actor, run.created_by_id, "rerun this run")
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


def scheduler_kick(*, cpu: bool = True) -> None:
    """Ask for a quick scheduler pass once the current transaction commits (cheap when one runs).

    cpu=False when what changed can only help GPU runs (a run ended and freed its GPUs): a CPU
    run waits for a host, never for a GPU, so that pass need not read the CPU runs' queue.
    """
    transaction.on_commit(lambda: enqueue("experiments.tasks.schedule", cpu=cpu))


def enqueue(task_name: str, *args: Any, **kwargs: Any) -> None:
    """Send a task by name, now (callers that must wait for their commit wrap this in
    transaction.on_commit); a broker outage is logged, the timers catch up."""
    from labsite.celery import app

    try:
        app.send_task(task_name, args=args, kwargs=kwargs)
    except Exception:  # noqa: BLE001 - the beat-driven passes repair anything missed here
        log.warning("could not enqueue %s%r; the periodic pass will pick it up", task_name, args)


# --- sweeps ------------------------------------------------------------------------------


def grid_size(parameters: Mapping[str, Any]) -> int:
    """How many points the grid has: the product of its list lengths, nothing expanded."""
    return math.prod(len(values) for values in parameters.values())


def grid_points(parameters: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the parameter lists, in the order the keys were given."""
    keys = list(parameters)
    values = [parameters[k] for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def _check_parameters(parameters: Any) -> dict[str, list[Any]]:
    if not isinstance(parameters, dict) or not parameters:
        raise ValidationError({"parameters": "must be a non-empty object of name: [values]"})
    clean = {}
    for key, values in parameters.items():
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", str(key)):
            raise ValidationError({"parameters": f"{key!r} is not a valid parameter name"})
        if not isinstance(values, list) or not values:
            raise ValidationError({"parameters": f"{key}: must be a non-empty list of values"})
        for value in values:
            if not isinstance(value, str | int | float | bool):
                raise ValidationError({"parameters": f"{key}: values must be strings or numbers"})
        clean[str(key)] = values
    return clean


def _check_grid_size(points: int, max_runs: int | None) -> None:
    """Refuse a grid before expanding it: its size is known from the list lengths alone."""
    most = lab_limit("MAX_GRID_POINTS")
    if points > most:
        raise ValidationError(
            {
                "parameters": f"the grid has {points} points; this lab allows at most {most} "
                "per sweep (LABSITE_MAX_GRID_POINTS)"
            }
        )
    most = lab_limit("MAX_RUNS_PER_REQUEST")
    if points > most:
        raise ValidationError(
            {
                "parameters": f"the grid has {points} points; this lab creates at most {most} "
                "runs per request (LABSITE_MAX_RUNS_PER_REQUEST)"
            }
        )
    if max_runs is not None and points > max_runs:
        raise ValidationError(
            {
                "max_runs": f"the grid has {points} points, more than max_runs={max_runs}; "
                "shrink the grid or raise max_runs"
            }
        )


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def grid_command(base_command: str, point: Mapping[str, Any]) -> str:
    """`base_command --key=value ...` with every value shell-quoted."""
    args = [shlex.quote(f"--{k}={_format_value(v)}") for k, v in point.items()]
    return " ".join([base_command.strip(), *args])


def _grid_run_ids(count: int) -> list[str]:
    """Ids that sort in grid order: runs inserted in one statement can share a created_at,
    and the sweep lists its runs by (created_at, id). A whole random id as the prefix keeps
    two grids' ranges from meeting."""
    prefix = new_id()
    return [f"{prefix}{i:06x}" for i in range(count)]


def _check_plan_link(plan: Plan | None) -> None:
    if plan is not None and plan.status in {PlanStatus.REJECTED, PlanStatus.ARCHIVED}:
        raise ValidationError({"plan_id": f"plan {plan.id} is {plan.status}"})


def _check_sweep_fields(*, actor: Actor, name: str, plan: Plan | None) -> str:
    name = _check_name("name", name, Sweep)
    if not name:
        raise ValidationError({"name": "must not be empty"})
    _require_link(actor, plan)
    _check_plan_link(plan)
    return name


def sweep_create_wild(
    *, actor: Actor, name: str, goal: str = "", chat_session_id: str = "", plan: Plan | None = None
) -> Sweep:
    """An empty sweep an agent fills with runs as it goes."""
    name = _check_sweep_fields(actor=actor, name=name, plan=plan)
    return Sweep.objects.create(
        name=name,
        goal=goal or "",
        kind=SweepKind.WILD,
        chat_session_id=chat_session_id or "",
        plan=plan,
        created_by=actor.user,
    )


def sweep_create_grid(
    *,
    actor: Actor,
    name: str,
    base_command: str,
    parameters: Any,
    max_runs: int | None = None,
    goal: str = "",
    auto_start: bool = False,
    chat_session_id: str = "",
    plan: Plan | None = None,
    run_options: Mapping[str, Any] | None = None,
) -> Sweep:
    """A sweep with one run per grid point; a grid larger than max_runs is refused, never cut.

    The runs and their "created" events are bulk inserts: the queries do not grow with the grid.
    """
    name = _check_sweep_fields(actor=actor, name=name, plan=plan)
    base_command = _check_command("base_command", base_command)
    clean = _check_parameters(parameters)
    check_int("max_runs", max_runs, minimum=1)
    _check_grid_size(grid_size(clean), max_runs)
    options = dict(run_options or {})
    sweep = Sweep(
        name=name,
        goal=goal or "",
        kind=SweepKind.GRID,
        base_command=base_command,
        parameters=clean,
        max_runs=max_runs,
        chat_session_id=chat_session_id or "",
        plan=plan,
        created_by=actor.user,
    )
    spec = _run_spec(
        actor=actor,
        sweep=sweep,
        plan=None,
        workdir=options.pop("workdir", ""),
        env=options.pop("env", None),
        gpus=options.pop("gpus", None),
        min_free_mem_mb=options.pop("min_free_mem_mb", None),
        gpuwrap_config=options.pop("gpuwrap_config", None),
        host=options.pop("host", None),
        priority=options.pop("priority", 0),
        chat_session_id=chat_session_id,
        auto_start=auto_start,
        parent=None,
    )
    if options:
        raise TypeError(f"unknown run options: {', '.join(sorted(options))}")
    points = grid_points(clean)
    runs = []
    for i, (point, run_id) in enumerate(zip(points, _grid_run_ids(len(points)), strict=True)):
        label = ",".join(f"{k}={_format_value(v)}" for k, v in point.items())
        try:
            run = _new_run(
                spec,
                command=grid_command(base_command, point),
                name=f"{name}[{i}] {label}"[: _name_limit(Run)],
                params=point,
                run_id=run_id,
            )
        except ValidationError as exc:
            why = " ".join(exc.messages)
            raise ValidationError(
                {"base_command": f"grid point {i} ({label[:100]}): its command {why}"}
            ) from exc
        runs.append(run)
    with transaction.atomic():
        sweep.save(force_insert=True)
        Run.objects.bulk_create(runs)
        RunEvent.objects.bulk_create([_created_event(run, actor=actor) for run in runs])
        if auto_start:
            scheduler_kick()
    return sweep


# --- plans -------------------------------------------------------------------------------

_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def _section_key(title: str) -> str | None:
    norm = re.sub(r"[^a-z]+", " ", title.lower()).strip()
    for name in PLAN_SECTIONS:
        canon = re.sub(r"[^a-z]+", " ", name.lower()).strip()
        if (
            norm == canon
            or norm.startswith(canon)
            or (name == "Risks & Mitigations" and norm.startswith("risks"))
        ):
            return name
    return None


def parse_plan_sections(markdown: str) -> dict[str, str]:
    """The known sections of a plan's markdown, keyed by their canonical names.

    A known heading starts a section; an unknown heading of the same or a higher level ends
    it; deeper headings and `# comments` inside fenced code stay part of it.
    """
    sections: dict[str, list[str]] = {}
    current: str | None = None
    level = 0
    fenced = False
    for line in (markdown or "").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        match = None if fenced else _HEADING.match(line)
        if match:
            depth = len(line) - len(line.lstrip("#"))
            key = _section_key(re.sub(r"^\d+[.)]\s*", "", match.group(1)))
            if key is not None:
                current, level = key, depth
                sections.setdefault(current, [])
                continue
            if current is not None and depth <= level:
                current = None
                continue
        if current is not None:
            sections[current].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items()}


def plan_create(
    *, actor: Actor, title: str, goal: str = "", raw_markdown: str = "", session_id: str | None = ""
) -> Plan:
    """A draft plan with its sections parsed from the markdown headings."""
    if not (title or "").strip():
        raise ValidationError({"title": "must not be empty"})
    with transaction.atomic():
        plan = Plan.objects.create(
            title=title.strip()[:300],
            goal=goal or "",
            raw_markdown=raw_markdown or "",
            sections=parse_plan_sections(raw_markdown or ""),
            session_id=session_id or "",
            author=actor.user,
        )
        PlanEvent.objects.create(
            plan=plan, to_status=plan.status, actor_kind=actor.kind, actor_user_id=actor.user_id
        )
    return plan


def plan_update(*, plan: Plan, actor: Actor, **changes: Any) -> Plan:
    """Edit a plan's text while it is a draft or has changes requested."""
    _require_owner(actor, plan.author_id, "edit this plan")
    editable = [PlanStatus.DRAFT, PlanStatus.CHANGES_REQUESTED]
    allowed = {k: v for k, v in changes.items() if k in {"title", "goal", "raw_markdown"}}
    if "title" in allowed and not str(allowed["title"]).strip():
        raise ValidationError({"title": "must not be empty"})
    if "raw_markdown" in allowed:
        allowed["sections"] = parse_plan_sections(allowed["raw_markdown"])
    if not Plan.objects.filter(pk=plan.pk, status__in=editable).update(
        **allowed, updated_at=timezone.now()
    ):
        plan.refresh_from_db()
        raise Conflict(f"plan {plan.id} is {plan.status}; only drafts can be edited")
    plan.refresh_from_db()
    return plan


def _plan_transition(
    *,
    plan: Plan,
    to: str,
    from_: Iterable[str],
    actor: Actor,
    comment: str = "",
    fields: Mapping[str, Any] | None = None,
) -> Plan:
    """Conditional update + PlanEvent: two PIs deciding at once leave exactly one decision."""
    sources = list(from_)
    with transaction.atomic():
        current = Plan.objects.filter(pk=plan.pk).values_list("status", flat=True).first()
        if current not in sources or not Plan.objects.filter(pk=plan.pk, status=current).update(
            status=to, updated_at=timezone.now(), **(fields or {})
        ):
            plan.refresh_from_db()
            raise Conflict(f"plan {plan.id} is {plan.status}; cannot move it to {to}")
        PlanEvent.objects.create(
            plan=plan,
            from_status=current,
            to_status=to,
            comment=comment or "",
            actor_kind=actor.kind,
            actor_user_id=actor.user_id,
        )
    plan.refresh_from_db()
    return plan


def plan_submit(*, plan: Plan, actor: Actor, comment: str = "") -> Plan:
    _require_owner(actor, plan.author_id, "submit this plan")
    return _plan_transition(
        plan=plan,
        to=PlanStatus.PENDING_REVIEW,
        from_=PLAN_SUBMITTABLE,
        actor=actor,
        comment=comment,
        fields={"submitted_at": timezone.now()},
    )


def _require_pi(actor: Actor) -> None:
    if not roles.is_pi(actor.user):
        raise PermissionDenied("only a PI may decide on plans")


def _plan_runs(plan: Plan, statuses: Iterable[str]) -> list[str]:
    return list(
        Run.objects.filter(Q(plan=plan) | Q(plan__isnull=True, sweep__plan=plan))
        .filter(status__in=list(statuses))
        .values_list("id", flat=True)
    )


def plan_approve(
    *, plan: Plan, actor: Actor, comment: str = "", gpu_hours_budget: float | None = None
) -> Plan:
    """Approve, and release the plan's held runs to the queue.

    A PI approving their own plan is marked self_approved (on the plan and in its event), or
    refused where the lab turned LABSITE_PI_SELF_APPROVAL off.
    """
    _require_pi(actor)
    if gpu_hours_budget is not None and not (
        math.isfinite(gpu_hours_budget) and gpu_hours_budget >= 0
    ):
        raise ValidationError({"gpu_hours_budget": "must be a finite number, 0 or more"})
    own = plan.author_id == actor.user_id
    if own and not settings.LABSITE["PI_SELF_APPROVAL"]:
        raise PermissionDenied(
            "you wrote this plan: this lab does not let a PI approve their own plan "
            "(LABSITE_PI_SELF_APPROVAL is off); ask another PI"
        )
    plan = _plan_transition(
        plan=plan,
        to=PlanStatus.APPROVED,
        from_=PLAN_DECIDABLE,
        actor=actor,
        comment=(f"self-approved: {comment}" if comment else "self-approved") if own else comment,
        fields={
            "reviewer": actor.user,
            "review_comment": comment or "",
            "decided_at": timezone.now(),
            "gpu_hours_budget": gpu_hours_budget,
            "self_approved": own,
        },
    )
    with transaction.atomic():
        for run_id in _plan_runs(plan, [RunStatus.HELD]):
            run_transition(
                run_id=run_id,
                to=RunStatus.QUEUED,
                from_=[RunStatus.HELD],
                actor=actor,
                reason="plan_approved",
                message=f"plan {plan.id} approved",
            )
        scheduler_kick()
    return plan


def plan_reject(*, plan: Plan, actor: Actor, comment: str = "") -> Plan:
    """Reject, and stop the work that was waiting for it (reason plan_rejected)."""
    _require_pi(actor)
    plan = _plan_transition(
        plan=plan,
        to=PlanStatus.REJECTED,
        from_=PLAN_DECIDABLE,
        actor=actor,
        comment=comment,
        fields={
            "reviewer": actor.user,
            "review_comment": comment or "",
            "decided_at": timezone.now(),
        },
    )
    for run_id in _plan_runs(plan, [RunStatus.HELD, RunStatus.READY, RunStatus.QUEUED]):
        run_transition(
            run_id=run_id,
            to=RunStatus.STOPPED,
            actor=actor,
            from_=[RunStatus.HELD, RunStatus.READY, RunStatus.QUEUED],
            reason=RunReason.PLAN_REJECTED,
            message=f"plan {plan.id} rejected: {comment}"[:500],
        )
    return plan


def plan_request_changes(*, plan: Plan, actor: Actor, comment: str = "") -> Plan:
    _require_pi(actor)
    if not (comment or "").strip():
        raise ValidationError({"comment": "say which changes you want"})
    return _plan_transition(
        plan=plan,
        to=PlanStatus.CHANGES_REQUESTED,
        from_=PLAN_DECIDABLE,
        actor=actor,
        comment=comment,
        fields={"reviewer": actor.user, "review_comment": comment, "decided_at": timezone.now()},
    )


def plan_archive(*, plan: Plan, actor: Actor, comment: str = "") -> Plan:
    _require_owner(actor, plan.author_id, "archive this plan")
    return _plan_transition(
        plan=plan, to=PlanStatus.ARCHIVED, from_=PLAN_ARCHIVABLE, actor=actor, comment=comment
    )


# --- alerts ------------------------------------------------------------------------------

ALERT_ACTIONS = {"stop": run_stop, "rerun": run_rerun}


def alert_raise(
    *,
    message: str,
    run: Run | None = None,
    severity: str = "warning",
    choices: Iterable[str] = ("acknowledge",),
) -> Alert:
    return Alert.objects.create(run=run, message=message, severity=severity, choices=list(choices))


def alert_respond(*, alert: Alert, actor: Actor, choice: str) -> Alert:
    """Record the answer once, then act on the run when the choice is an action."""
    if alert.run is not None:
        _require_owner(actor, alert.run.created_by_id, "answer this alert")
    elif not (roles.is_pi(actor.user) or roles.is_admin(actor.user)):
        raise PermissionDenied("only a PI or an admin may answer lab-wide alerts")
    if choice not in alert.choices:
        raise ValidationError({"choice": f"{choice!r} is not one of {', '.join(alert.choices)}"})
    with transaction.atomic():
        if not Alert.objects.filter(pk=alert.pk, status=AlertStatus.OPEN).update(
            status=AlertStatus.RESOLVED,
            response=choice,
            responded_by=actor.user,
            responded_at=timezone.now(),
        ):
            alert.refresh_from_db()
            raise Conflict(f"alert {alert.pk} was already answered ({alert.response})")
        action = ALERT_ACTIONS.get(choice)
        if (
            alert.run is not None
            and action is not None
            and alert.run.status in NON_TERMINAL | (TERMINAL if choice == "rerun" else set())
        ):
            action(run=alert.run, actor=actor)
    alert.refresh_from_db()
    return alert
