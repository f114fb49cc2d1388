"""Pages: parse the form, call one service, redirect. Reads come from selectors; never SSH.

One view serves a full page and its HTMX partial (`request.htmx`, NetBox's habit). A
polling partial stops itself by answering HTTP 286 once there is nothing left to watch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from django.contrib import messages
from django.contrib.auth.decorators import login_required as django_login_required
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404 as django_get_object_or_404
from django.shortcuts import redirect, render
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_POST
from django_htmx.http import HTMX_STOP_POLLING, HttpResponseClientRedirect
from rest_framework.exceptions import ValidationError as FilterError

from experiments import selectors, services
from experiments.actors import Actor
from experiments.api.filters import PlanFilter, RunFilter
from experiments.api.serializers import redact_env
from experiments.choices import (
    PLAN_ARCHIVABLE,
    PLAN_DECIDABLE,
    PLAN_SECTIONS,
    PLAN_SUBMITTABLE,
    TERMINAL,
    PlanStatus,
)
from experiments.forms import (
    ApproveForm,
    CommentForm,
    PlanForm,
    RejectForm,
    RequestChangesForm,
    RunFilterForm,
    RunForm,
    TokenForm,
    add_service_errors,
)
from experiments.models import Plan, Run
from labsite import roles
from labsite.api import KEY_PATTERN
from labsite.errors import Conflict
from labsite.models import ApiToken

PAGE_SIZE = 50
SERVICE_ERRORS = (ValidationError, PermissionDenied, Conflict)
PLAN_EDITABLE = frozenset({PlanStatus.DRAFT, PlanStatus.CHANGES_REQUESTED})


def _partial(request: HttpRequest) -> bool:
    htmx = getattr(request, "htmx", None)
    return htmx is not None and bool(htmx) and not htmx.boosted


def login_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Django's login_required; but a poll from an expired session sends the whole page to
    the login form (HX-Redirect) rather than swapping the form into a table."""
    guarded = django_login_required(view)

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated and _partial(request):
            here = urlsplit(request.htmx.current_url or request.path)  # type: ignore[attr-defined]
            back = here.path + (f"?{here.query}" if here.query else "")
            return HttpResponseClientRedirect(redirect_to_login(back)["Location"])
        return guarded(request, *args, **kwargs)

    return wrapper


def _error_text(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        if hasattr(exc, "error_dict"):
            return "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
        return " ".join(exc.messages)
    return str(exc) or "not allowed"


def object_or_404(queryset: Any, *, pk: str) -> Any:
    """Django's shortcut, but a key no object could have (NUL, odd characters) is a 404
    without a query: PostgreSQL answers NUL with an error, not with no rows."""
    if not KEY_PATTERN.fullmatch(pk):
        raise Http404(pk[:64])
    return django_get_object_or_404(queryset, pk=pk)


def _actor(request: HttpRequest) -> Actor:
    return Actor.from_request(request)


def _filtered(filterset: Any) -> tuple[QuerySet[Any], str]:
    """A filter's rows, or none and the reason when a filter value cannot match."""
    try:
        return filterset.qs, ""
    except FilterError as exc:
        detail = exc.detail
        values = detail.values() if isinstance(detail, dict) else [detail]
        flat = [m for v in values for m in (v if isinstance(v, list) else [v])]
        return filterset.queryset.none(), " ".join(str(m) for m in flat)


# --- dashboard ---------------------------------------------------------------------------


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """Lab counts and the runs table; the live part is re-fetched by HTMX every 3 s."""
    runs_filter = RunFilter(request.GET, queryset=selectors.runs_list().select_related("sweep"))
    runs, filter_error = _filtered(runs_filter)
    context: dict[str, Any] = {
        "health": selectors.system_health(),
        "page": Paginator(runs, PAGE_SIZE).get_page(request.GET.get("page")),
        "filter_error": filter_error,
        "filtered": any(request.GET.get(k) for k in ("status", "host", "sweep_id")),
    }
    if _partial(request):
        return render(request, "experiments/partials/dashboard_live.html", context)
    context["filter_form"] = RunFilterForm(request.GET)
    return render(request, "experiments/dashboard.html", context)


# --- runs --------------------------------------------------------------------------------


@login_required
def run_new(request: HttpRequest) -> HttpResponse:
    """Create a run; service errors land on the form's fields."""
    initial = {k: request.GET[k] for k in ("sweep", "plan") if request.GET.get(k)}
    form = RunForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            run = services.run_create(actor=_actor(request), **form.service_kwargs())
        except ValidationError as exc:
            add_service_errors(form, exc)
        except (PermissionDenied, Conflict) as exc:
            form.add_error(None, _error_text(exc))
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
    if _partial(request):
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
        result = service(run=run, actor=_actor(request))
    except SERVICE_ERRORS as exc:
        messages.error(request, f"Could not {verb} run {run.id}: {_error_text(exc)}")
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


# --- sweeps ------------------------------------------------------------------------------


def _sweep_row(sweep: Any) -> dict[str, Any]:
    counts = selectors.sweep_counts(sweep)
    total = sum(counts.values())
    done = sum(counts[s] for s in TERMINAL)
    return {
        "sweep": sweep,
        "counts": {k: v for k, v in counts.items() if v},
        "status": selectors.sweep_status(counts),
        "total": total,
        "done": done,
    }


@login_required
def sweep_list(request: HttpRequest) -> HttpResponse:
    # Meta.ordering does not apply to the annotated (GROUP BY) query: order explicitly.
    sweeps = selectors.sweeps_list().select_related("plan").order_by("-created_at", "id")
    page = Paginator(sweeps, PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [_sweep_row(sweep) for sweep in page]
    return render(request, "experiments/sweep_list.html", {"page": page, "rows": rows})


@login_required
def sweep_detail(request: HttpRequest, sweep_id: str) -> HttpResponse:
    sweep = object_or_404(selectors.sweeps_list().select_related("plan"), pk=sweep_id)
    runs = selectors.runs_list().filter(sweep=sweep).order_by("created_at", "id")
    return render(
        request,
        "experiments/sweep_detail.html",
        {**_sweep_row(sweep), "runs": runs, "param_names": list(sweep.parameters)},
    )


# --- plans -------------------------------------------------------------------------------


@login_required
def plan_list(request: HttpRequest) -> HttpResponse:
    plans_filter = PlanFilter(
        request.GET, queryset=Plan.objects.select_related("author", "reviewer")
    )
    plans, filter_error = _filtered(plans_filter)
    if filter_error:
        messages.error(request, filter_error)
    page = Paginator(plans, PAGE_SIZE).get_page(request.GET.get("page"))
    return render(
        request,
        "experiments/plan_list.html",
        {
            "page": page,
            "statuses": PlanStatus.choices,
            "current_status": request.GET.get("status", ""),
        },
    )


@login_required
def plan_new(request: HttpRequest) -> HttpResponse:
    form = PlanForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            plan = services.plan_create(actor=_actor(request), **form.cleaned_data)
        except ValidationError as exc:
            add_service_errors(form, exc)
        else:
            messages.success(request, "Plan saved as a draft. Submit it for review when ready.")
            return redirect("plan_detail", plan_id=plan.id)
    return render(request, "experiments/plan_form.html", {"form": form, "plan": None})


@login_required
def plan_edit(request: HttpRequest, plan_id: str) -> HttpResponse:
    plan = object_or_404(Plan, pk=plan_id)
    initial = {"title": plan.title, "goal": plan.goal, "raw_markdown": plan.raw_markdown}
    form = PlanForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            plan = services.plan_update(plan=plan, actor=_actor(request), **form.cleaned_data)
        except ValidationError as exc:
            add_service_errors(form, exc)
        except (PermissionDenied, Conflict) as exc:
            messages.error(request, f"Could not edit the plan: {_error_text(exc)}")
            return redirect("plan_detail", plan_id=plan.id)
        else:
            messages.success(request, "Plan updated.")
            return redirect("plan_detail", plan_id=plan.id)
    return render(request, "experiments/plan_form.html", {"form": form, "plan": plan})


def _plan_page(
    request: HttpRequest, plan: Plan, bound: dict[str, Any] | None = None, status: int = 200
) -> HttpResponse:
    from experiments.markdown import render_markdown

    user = request.user
    owner = roles.can_act_on(user, plan.author_id)
    context = {
        "plan": plan,
        # The body as the section parser read it (one parser for both), sanitized HTML, its
        # headings nested under the card's <h2>: an agent's "## Objective" is an <h3>.
        "body_html": render_markdown(plan.raw_markdown, heading_offset=1),
        # What a reviewer checks first: which of the sections agents write are there.
        "sections": [(name, name in plan.sections) for name in PLAN_SECTIONS],
        "events": plan.events.select_related("actor_user"),
        "runs": selectors.runs_list().filter(Q(plan=plan) | Q(plan__isnull=True, sweep__plan=plan)),
        "sweeps": plan.sweeps.all(),
        "can_submit": owner and plan.status in PLAN_SUBMITTABLE,
        "can_edit": owner and plan.status in PLAN_EDITABLE,
        "can_archive": owner and plan.status in PLAN_ARCHIVABLE,
        "can_decide": roles.is_pi(user) and plan.status in PLAN_DECIDABLE,
        "submit_form": CommentForm(prefix="submit"),
        "approve_form": ApproveForm(prefix="approve"),
        "reject_form": RejectForm(prefix="reject"),
        "changes_form": RequestChangesForm(prefix="changes"),
        **(bound or {}),
    }
    return render(request, "experiments/plan_detail.html", context, status=status)


@login_required
def plan_detail(request: HttpRequest, plan_id: str) -> HttpResponse:
    plan = object_or_404(Plan.objects.select_related("author", "reviewer"), pk=plan_id)
    return _plan_page(request, plan)


# action -> (form class, form prefix and context key, service, what the message says)
PLAN_ACTIONS: dict[str, tuple[type[Any], str, Any, str]] = {
    "submit": (CommentForm, "submit", services.plan_submit, "submitted for review"),
    "approve": (ApproveForm, "approve", services.plan_approve, "approved"),
    "reject": (RejectForm, "reject", services.plan_reject, "rejected"),
    "request_changes": (
        RequestChangesForm,
        "changes",
        services.plan_request_changes,
        "sent back for changes",
    ),
    "archive": (CommentForm, "archive", services.plan_archive, "archived"),
}


@login_required
@require_POST
def plan_action(request: HttpRequest, plan_id: str, action: str) -> HttpResponse:
    """Submit, approve, reject, request changes or archive: one service call each."""
    if action not in PLAN_ACTIONS:
        raise Http404(action)
    plan = object_or_404(Plan.objects.select_related("author", "reviewer"), pk=plan_id)
    form_class, prefix, service, done = PLAN_ACTIONS[action]
    form = form_class(request.POST, prefix=prefix)
    if form.is_valid():
        try:
            service(plan=plan, actor=_actor(request), **form.cleaned_data)
        except ValidationError as exc:
            add_service_errors(form, exc)
        except (PermissionDenied, Conflict) as exc:
            messages.error(request, f"Could not do that: {_error_text(exc)}")
            return redirect("plan_detail", plan_id=plan.id)
        else:
            messages.success(request, f"Plan {done}.")
            return redirect("plan_detail", plan_id=plan.id)
    plan.refresh_from_db()
    return _plan_page(request, plan, {f"{prefix}_form": form}, status=400)


# --- cluster -----------------------------------------------------------------------------


def _gpu_card(gpu: dict[str, Any]) -> dict[str, Any]:
    total, used = gpu["memory_total_mb"], gpu["memory_used_mb"]
    return {
        **gpu,
        "memory_pct": min(100, round(100 * used / total)) if total else 0,
        "memory_used_gib": f"{used / 1024:.1f}",
        "memory_total_gib": f"{total / 1024:.0f}",
        "state_label": "busy (not ours)" if gpu["state"] == selectors.GPU_FOREIGN else gpu["state"],
    }


@login_required
def cluster(request: HttpRequest) -> HttpResponse:
    """The GPU board from the latest inventory; HTMX refreshes it every 5 s."""
    state = selectors.cluster_state()
    for host in state["hosts"]:
        host["gpus"] = [_gpu_card(gpu) for gpu in host["gpus"]]
    context = {"cluster": state}
    if _partial(request):
        return render(request, "experiments/partials/cluster_board.html", context)
    return render(request, "experiments/cluster.html", context)


# --- API tokens --------------------------------------------------------------------------


def _my_tokens(request: HttpRequest) -> QuerySet[ApiToken]:
    """Only the signed-in user's tokens: another user's token id is simply not found."""
    user: Any = request.user  # login_required: never anonymous here
    return ApiToken.objects.filter(user=user)


@login_required
def token_list(request: HttpRequest) -> HttpResponse:
    tokens = _my_tokens(request).order_by("revoked", "-created_at")
    return render(request, "experiments/token_list.html", {"tokens": tokens, "form": TokenForm()})


@login_required
@require_POST
def token_create(request: HttpRequest) -> HttpResponse:
    """Issue a token and show its raw value on this response only; it is never stored."""
    form = TokenForm(request.POST)
    if not form.is_valid():
        tokens = _my_tokens(request).order_by("revoked", "-created_at")
        return render(
            request, "experiments/token_list.html", {"tokens": tokens, "form": form}, status=400
        )
    token, raw = ApiToken.issue(request.user, name=form.cleaned_data["name"])
    response = render(
        request,
        "experiments/token_created.html",
        {"token": token, "raw": raw, "api_base": request.build_absolute_uri("/api")},
    )
    add_never_cache_headers(response)
    return response


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    revoked = _my_tokens(request).filter(pk=token_id, revoked=False).update(revoked=True)
    if revoked:
        messages.success(request, "Token revoked; requests that send it now get 401.")
    else:
        messages.error(request, "No such active token.")
    return redirect("token_list")
