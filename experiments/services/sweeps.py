"""Sweeps: a parameter grid expanded into runs in bulk, or a wild sweep an agent fills."""

from __future__ import annotations

import itertools
import math
import re
import shlex
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from clusters.choices import HostKind
from experiments import jobs
from experiments.actors import Actor
from experiments.choices import (
    SweepKind,
)
from experiments.models import (
    Plan,
    Run,
    RunEvent,
    Sweep,
    new_id,
)
from experiments.services.runspec import (
    check_command,
    check_name,
    check_plan_link,
    created_event,
    name_limit,
    new_run,
    require_link,
    run_spec,
    settle_start,
)
from labsite.validation import check_int, check_size, json_size, lab_limit


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
    check_size("parameters", json_size(clean), "MAX_PARAMS_BYTES", "bytes as JSON")
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


def _check_sweep_fields(*, actor: Actor, name: str, plan: Plan | None) -> str:
    name = check_name("name", name, Sweep)
    if not name:
        raise ValidationError({"name": "must not be empty"})
    require_link(actor, plan)
    check_plan_link(plan)
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
    slurm_array_throttle: int | None = None,
) -> Sweep:
    """A sweep with one run per grid point; a grid larger than max_runs is refused, never cut.
    On a Slurm host with `slurm_array_throttle`, its runs go to Slurm as one job array.

    The runs and their "created" events are bulk inserts, and the check that no host could
    ever take them is one query: the queries do not grow with the grid.
    """
    name = _check_sweep_fields(actor=actor, name=name, plan=plan)
    base_command = check_command("base_command", base_command)
    clean = _check_parameters(parameters)
    check_int("max_runs", max_runs, minimum=1)
    _check_grid_size(grid_size(clean), max_runs)
    options = dict(run_options or {})
    host = options.get("host")
    if slurm_array_throttle is not None and (host is None or host.kind != HostKind.SLURM):
        raise ValidationError(
            {"slurm_array_throttle": "a job array is for a sweep on a Slurm host (`host`)"}
        )
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
        slurm_array_throttle=slurm_array_throttle,
    )
    spec = run_spec(
        actor=actor,
        sweep=sweep,
        plan=None,
        workdir=options.pop("workdir", ""),
        env=options.pop("env", None),
        gpus=options.pop("gpus", None),
        min_free_mem_mb=options.pop("min_free_mem_mb", None),
        cpus=options.pop("cpus", 1),
        memory_mb=options.pop("memory_mb", None),
        gpuwrap_config=options.pop("gpuwrap_config", None),
        host=options.pop("host", None),
        slurm=options.pop("slurm", None),
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
            run = new_run(
                spec,
                command=grid_command(base_command, point),
                name=f"{name}[{i}] {label}"[: name_limit(Run)],
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
        # Held or queued, under the plan's row lock: see runspec.lock_plan_status.
        settle_start(runs, plan=plan)
        sweep.save(force_insert=True)
        Run.objects.bulk_create(runs)
        RunEvent.objects.bulk_create([created_event(run, actor=actor) for run in runs])
        if auto_start:
            jobs.kick_scheduler()
    return sweep
