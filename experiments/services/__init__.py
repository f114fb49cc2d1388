"""All writes to the lab's work; a run's status changes only through run_transition (one run)
or runs_transition (a set of runs, in queries that do not grow with it).

One module per concern: runs (transitions, creation, start/stop/rerun), runspec (the checks
every way of creating runs shares), sweeps, plans, alerts. Callers use this package's names.
"""

from experiments.services.alerts import alert_raise, alert_respond
from experiments.services.plans import (
    parse_plan_sections,
    plan_approve,
    plan_archive,
    plan_create,
    plan_reject,
    plan_request_changes,
    plan_submit,
    plan_update,
)
from experiments.services.runs import (
    run_create,
    run_event,
    run_gpus_confirm,
    run_rerun,
    run_start,
    run_stop,
    run_transition,
    runs_transition,
)
from experiments.services.runspec import validate_gpuwrap_config
from experiments.services.sweeps import (
    grid_command,
    grid_points,
    grid_size,
    sweep_create_grid,
    sweep_create_wild,
)

__all__ = [
    "alert_raise",
    "alert_respond",
    "grid_command",
    "grid_points",
    "grid_size",
    "parse_plan_sections",
    "plan_approve",
    "plan_archive",
    "plan_create",
    "plan_reject",
    "plan_request_changes",
    "plan_submit",
    "plan_update",
    "run_create",
    "run_event",
    "run_gpus_confirm",
    "run_rerun",
    "run_start",
    "run_stop",
    "run_transition",
    "runs_transition",
    "sweep_create_grid",
    "sweep_create_wild",
    "validate_gpuwrap_config",
]
