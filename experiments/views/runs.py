"""The dashboard and the runs pages: list, new, detail, start, stop, rerun."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST
from django_htmx.http import HTMX_STOP_POLLING

from experiments import selectors, services
from experiments.api.filters import RunFilter
from experiments.api.serializers import redact_env
from experiments.choices import (
    TERMINAL,
)
from experiments.forms import (
    RunFilterForm,
    RunForm,
    add_service_errors,
)
from experiments.models import Run
from experiments.views.common import (
    PAGE_SIZE,
    SERVICE_ERRORS,
    actor_of,
    error_text,
    filtered,
    is_partial,
    login_required,
    object_or_404,
)
from labsite import roles
from labsite.errors import Conflict

# --- dashboard ---------------------------------------------------------------------------


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """Lab counts and the runs table; the live part is re-fetched by HTMX every 3 s."""
    runs_filter = RunFilter(request.GET, queryset=selectors.runs_list().select_related("sweep"))
    runs, filter_error = filtered(runs_filter)
    context: dict[str, Any] = {
        "health": selectors.system_health(),
        "page": Paginator(runs, PAGE_SIZE).get_page(request.GET.get("page")),
        "filter_error": filter_error,
        "filtered": any(request.GET.get(k) for k in ("status", "host", "sweep_id")),
    }
    if is_partial(request):
        return render(request, "experiments/partials/dashboard_live.html", context)
    context["filter_form"] = RunFilterForm(request.GET)
    return render(request, "experiments/dashboard.html", context)


@login_required
def run_new(request: HttpRequest) -> HttpResponse:
    """Create a run; service errors land on the form's fields."""
    initial = {k: request.GET[k] for k in ("sweep", "plan") if request.GET.get(k)}
    form = RunForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            run = services.run_create(actor=actor_of(request), **form.service_kwargs())
        except ValidationError as exc:
            add_service_errors(form, exc)
        except (PermissionDenied, Conflict) as exc:
            form.add_error(None, error_text(exc))
        else:
            messages.success(request, f"Run {run.name} created ({run.status}).")
            return redirect("run_detail", run_id=run.id)
    return render(request, "experiments/run_form.html", {"form": form})


def _run_context(request: HttpRequest, run: Run) -> dict[str, Any]:
    timestamps = [
        (label, getattr(run, field))
        for label, field in (
            ("Created", "created_at"),
            ("Held", "held_at"),
            ("Queued", "queued_at"),
            ("Launched", "launched_at"),
            ("Started", "started_at"),
            ("Ended", "ended_at"),
            ("Stop requested", "stop_requested_at"),
        )
        if getattr(run, field)
    ]
    return {
        "run": run,
        "terminal": run.status in TERMINAL,
        "can_act": roles.can_act_on(request.user, run.created_by_id),
        "leases": getattr(run, "active_leases", []),
        "timestamps": timestamps,
        "events": run.events.select_related("actor_user", "actor_token"),
    }


@login_required
def run_detail(request: HttpRequest, run_id: str) -> HttpResponse:
    """A run, its leases and its audit trail; the status block polls until the run ends."""
    run = object_or_404(selectors.runs_list().select_related("sweep", "plan", "parent"), pk=run_id)
    context = _run_context(request, run)
    if is_partial(request):
        response = render(request, "experiments/partials/run_status.html", context)
        if context["terminal"]:
            # htmx still swaps this last answer in, then cancels the `every 3s` trigger.
            response.status_code = HTMX_STOP_POLLING
        return response
    context["reruns"] = run.reruns.order_by("-created_at")[:20]
    context["env"] = redact_env(run.env)
    return render(request, "experiments/run_detail.html", context)


def _run_action(
    request: HttpRequest, run_id: str, service: Any, verb: str
) -> tuple[Run | None, HttpResponse]:
    run = object_or_404(Run, pk=run_id)
    try:
        result = service(run=run, actor=actor_of(request))
    except SERVICE_ERRORS as exc:
        messages.error(request, f"Could not {verb} run {run.id}: {error_text(exc)}")
        return None, redirect("run_detail", run_id=run.id)
    return result, redirect("run_detail", run_id=result.id)


@login_required
@require_POST
def run_start(request: HttpRequest, run_id: str) -> HttpResponse:
    run, response = _run_action(request, run_id, services.run_start, "start")
    if run is not None:
        messages.success(request, f"Run {run.id} is {run.status}.")
    return response


@login_required
@require_POST
def run_stop(request: HttpRequest, run_id: str) -> HttpResponse:
    run, response = _run_action(request, run_id, services.run_stop, "stop")
    if run is not None:
        if run.status in TERMINAL:
            messages.success(request, f"Run {run.id} stopped.")
        else:
            messages.success(request, f"Stop sent to run {run.id}; it ends once its host confirms.")
    return response


@login_required
@require_POST
def run_rerun(request: HttpRequest, run_id: str) -> HttpResponse:
    run, response = _run_action(request, run_id, services.run_rerun, "rerun")
    if run is not None:
        messages.success(request, f"Rerun created: {run.id} ({run.status}).")
    return response
