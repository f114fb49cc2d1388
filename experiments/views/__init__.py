"""Pages, one module per part of the site: parse the form, call one service, redirect. Reads
come from selectors; never SSH.

One view serves a full page and its HTMX partial (`request.htmx`, NetBox's habit). A
polling partial stops itself by answering HTTP 286 once there is nothing left to watch.
"""

from __future__ import annotations

from experiments.views.lab import (
    cluster,
    token_create,
    token_list,
    token_revoke,
)
from experiments.views.plans import (
    PLAN_ACTIONS,
    plan_action,
    plan_detail,
    plan_edit,
    plan_list,
    plan_new,
)
from experiments.views.runs import (
    dashboard,
    run_detail,
    run_new,
    run_rerun,
    run_start,
    run_stop,
)
from experiments.views.sweeps import (
    sweep_detail,
    sweep_list,
)

__all__ = [
    "PLAN_ACTIONS",
    "cluster",
    "dashboard",
    "plan_action",
    "plan_detail",
    "plan_edit",
    "plan_list",
    "plan_new",
    "run_detail",
    "run_new",
    "run_rerun",
    "run_start",
    "run_stop",
    "sweep_detail",
    "sweep_list",
    "token_create",
    "token_list",
    "token_revoke",
]
