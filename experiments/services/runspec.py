"""What runs are made of: the checks and fields every way of creating runs shares."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from clusters import localuser
from clusters import slurm as slurm_lib
from clusters.choices import HostKind
from clusters.models import Host
from experiments.actors import Actor
from experiments.capacity import PENDING_PASS, never_fits
from experiments.choices import (
    PLAN_CLEARED,
    STATE_TIMESTAMP,
    PlanStatus,
    RunReason,
    RunStatus,
)
from experiments.models import (
    Plan,
    Run,
    RunEvent,
    Sweep,
)
from labsite import roles
from labsite.validation import INT32_MAX, check_int, check_size, json_size, lab_limit

GPUWRAP_KEYS = {"enabled", "retries", "retry_delay_seconds"}
MAX_RETRY_DELAY_SECONDS = 86400
MAX_GPUS_PER_RUN = 64
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What the launcher sets for a run it pinned to GPUs; the run's own env must not undo it.
GPU_PINNING_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"})


def effective_plan(*, plan: Plan | None, sweep: Sweep | None) -> Plan | None:
    """The plan that clears a run: its own, or its sweep's."""
    return plan or (sweep.plan if sweep is not None else None)


def start_status(plan_status: str | None) -> str:
    """Where a run that starts goes: queued, or held while its plan (if any) is not approved."""
    return (
        RunStatus.QUEUED if plan_status is None or plan_status in PLAN_CLEARED else RunStatus.HELD
    )


def lock_plan_status(plan: Plan | None) -> str | None:
    """The plan's status, read under its row lock (until the caller's transaction ends).

    Approval and rejection take the same lock, so whatever starts runs under this plan while
    they run is decided before or after them, never in between: a run cannot be made held by
    a plan that is approved a moment later and miss its release. (SQLite has no row locks, but
    its transactions are BEGIN IMMEDIATE: one writer at a time, which serializes the same.)
    """
    if plan is None:
        return None
    status = (
        Plan.objects.select_for_update().filter(pk=plan.pk).values_list("status", flat=True).first()
    )
    if status is None:
        raise ValidationError({"plan_id": f"plan {plan.pk} no longer exists"})
    plan.status = status
    check_plan_link(plan)
    return status


def settle_start(runs: list[Run], *, plan: Plan | None) -> None:
    """Held or queued for runs about to be inserted, decided under the plan's lock (the caller's
    transaction inserts them). Runs created ready wait for run_start and are left alone; the
    lock is taken for them too, so that a plan rejected meanwhile refuses them."""
    to = start_status(lock_plan_status(plan))
    now = timezone.now()
    for run in runs:
        if run.status == RunStatus.READY:
            continue
        run.status = to
        held = to == RunStatus.HELD
        run.reason = RunReason.PLAN_NOT_APPROVED if held else ""
        run.held_at, run.queued_at = (now, None) if held else (None, now)
        run.waiting_reason = "" if held else (run.waiting_reason or PENDING_PASS)


def waiting_reason_for(
    *,
    gpus: int,
    min_free_mem_mb: int | None,
    host: Host | None,
    owner: Any,
    cpus: int = 1,
    memory_mb: int | None = None,
) -> str:
    """The reason a run has the moment it is queued: why no enabled host could ever take it,
    if so (one query, per request, not per run), else that it waits for the next pass."""
    if host is not None and host.kind == HostKind.SLURM:
        return PENDING_PASS  # Slurm says why a job waits, once it has it (runner.slurm)
    may_use_local = roles.is_admin(owner) or localuser.members_may_run_locally()
    never = never_fits(
        gpus=gpus,
        min_free_mem_mb=min_free_mem_mb,
        cpus=cpus,
        memory_mb=memory_mb,
        host=host,
        may_use_local=may_use_local,
    )
    return (never or PENDING_PASS)[:500]


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


def name_limit(model: type[Any]) -> int:
    """The longest name the lab allows for this model (and its column holds)."""
    column: int = model._meta.get_field("name").max_length
    return min(lab_limit("MAX_NAME_LENGTH"), column)


def check_name(field: str, name: str, model: type[Any]) -> str:
    """The name, stripped, within the lab's limit (ValidationError naming the limit if not)."""
    name = (name or "").strip()
    check_size(field, len(name), "MAX_NAME_LENGTH", "characters", most=name_limit(model))
    return name


def check_command(field: str, command: str) -> str:
    """The command, stripped: not empty, within the lab's limit."""
    command = (command or "").strip()
    if not command:
        raise ValidationError({field: "must not be empty"})
    check_size(field, len(command), "MAX_COMMAND_LENGTH", "characters")
    return command


def require_link(actor: Actor, target: Plan | Sweep | None) -> None:
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


def run_spec(
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
    cpus: int = 1,
    memory_mb: int | None = None,
    slurm: Mapping[str, Any] | None = None,
    chat_session_id: str,
    auto_start: bool,
    parent: Run | None,
) -> dict[str, Any]:
    """The checked fields that runs created together share (one run, or a grid's runs)."""
    wrap = validate_gpuwrap_config(gpuwrap_config)
    slurm_options = _check_slurm(slurm, host)
    if gpus is None:
        gpus = 1 if wrap.get("enabled") else 0
    check_int("gpus", gpus, minimum=0, maximum=MAX_GPUS_PER_RUN)
    check_int("min_free_mem_mb", min_free_mem_mb, minimum=0)
    check_int("cpus", cpus, minimum=1, maximum=4096)
    check_int("memory_mb", memory_mb, minimum=1)
    check_int("priority", priority, minimum=-INT32_MAX)
    if host is not None and host.kind == HostKind.SLURM:
        if not host.enabled:
            raise ValidationError({"host": f"host {host.name} is disabled"})
        asked = slurm_lib.merged(host.slurm or {}, slurm_options)
        if problem := slurm_lib.check_against(asked, gpus=gpus, facts=host.facts or {}):
            raise ValidationError({"slurm": problem})
    if host is not None and not host.enabled:
        raise ValidationError({"host": f"host {host.name} is disabled"})
    if host is not None and host.kind == HostKind.LOCAL and not roles.is_admin(actor.user):
        refusal = localuser.local_refusal()
        if refusal is not None:
            raise ValidationError({"host": localuser.admins_only_reason(refusal)})
    clean_env = _check_env(env, leases_gpus=gpus > 0 or bool(wrap.get("enabled")))
    linked_plan = effective_plan(plan=plan, sweep=sweep)
    for target in {id(t): t for t in (sweep, plan, linked_plan) if t is not None}.values():
        require_link(actor, target)
    check_plan_link(linked_plan)
    if settings.LABSITE["REQUIRE_PLAN_FOR_GPU_WORK"] and gpus > 0 and linked_plan is None:
        raise ValidationError(
            {"plan_id": "this lab requires a plan for GPU work: create one and pass plan_id"}
        )
    # Provisional: the transaction that inserts the runs decides again under the plan's lock.
    status = (
        start_status(linked_plan.status if linked_plan else None) if auto_start else RunStatus.READY
    )
    waiting = (
        waiting_reason_for(
            gpus=gpus,
            min_free_mem_mb=min_free_mem_mb,
            cpus=cpus,
            memory_mb=memory_mb,
            host=host,
            owner=actor.user,
        )
        if auto_start
        else ""
    )
    return {
        "workdir": workdir or "",
        "env": clean_env,
        "sweep": sweep,
        "plan": plan,
        "status": status,
        "reason": RunReason.PLAN_NOT_APPROVED if status == RunStatus.HELD else "",
        "waiting_reason": waiting,
        "priority": priority,
        "gpus": gpus,
        "min_free_mem_mb": min_free_mem_mb,
        "cpus": cpus,
        "memory_mb": memory_mb,
        "gpuwrap_config": wrap,
        "host": host,
        "host_pinned": host is not None,
        "slurm": slurm_options,
        "chat_session_id": chat_session_id or (sweep.chat_session_id if sweep else ""),
        "created_by": actor.user,
        "parent": parent,
        **({STATE_TIMESTAMP[status]: timezone.now()} if status in STATE_TIMESTAMP else {}),
    }


def _check_slurm(options: Mapping[str, Any] | None, host: Host | None) -> dict[str, Any]:
    """A run's own sbatch options: known keys and plain words, and only for a Slurm host."""
    try:
        clean = slurm_lib.check_options(options)
    except ValueError as exc:
        raise ValidationError({"slurm": str(exc)}) from exc
    if clean and (host is None or host.kind != HostKind.SLURM):
        raise ValidationError(
            {"slurm": "slurm options are for a run on a Slurm host: name it with `host`"}
        )
    return clean


def new_run(
    spec: Mapping[str, Any],
    *,
    command: str,
    name: str,
    params: Mapping[str, Any] | None,
    run_id: str | None = None,
) -> Run:
    """An unsaved run from a spec; the command and name are checked here, per run."""
    command = check_command("command", command)
    name = check_name("name", name, Run) or command.split()[0][: name_limit(Run)]
    params = dict(params or {})
    check_size("params", json_size(params), "MAX_PARAMS_BYTES", "bytes as JSON")
    run = Run(**spec, command=command, name=name, params=params)
    if run_id is not None:
        run.id = run_id
    return run


def created_event(run: Run, *, actor: Actor) -> RunEvent:
    """The first event of a run: who created it, and in which state."""
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


def check_plan_link(plan: Plan | None) -> None:
    """Work is not linked to a plan that was rejected or archived."""
    if plan is not None and plan.status in {PlanStatus.REJECTED, PlanStatus.ARCHIVED}:
        raise ValidationError({"plan_id": f"plan {plan.id} is {plan.status}"})


def require_owner(actor: Actor, owner_id: int | None, what: str) -> None:
    """Only the owner, a PI or an admin may act on the thing (PermissionDenied)."""
    if not roles.can_act_on(actor.user, owner_id):
        raise PermissionDenied(f"only its owner, a PI or an admin may {what}")
