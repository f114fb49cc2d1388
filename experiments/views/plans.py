"""The plans pages: list, new, edit, detail, and a PI's decisions."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from experiments import selectors, services
from experiments.api.filters import PlanFilter
from experiments.choices import (
    PLAN_ARCHIVABLE,
    PLAN_DECIDABLE,
    PLAN_SECTIONS,
    PLAN_SUBMITTABLE,
    PlanStatus,
)
from experiments.forms import (
    ApproveForm,
    CommentForm,
    PlanForm,
    RejectForm,
    RequestChangesForm,
    add_service_errors,
)
from experiments.models import Plan
from experiments.views.common import (
    PAGE_SIZE,
    PLAN_EDITABLE,
    actor_of,
    error_text,
    filtered,
    login_required,
    object_or_404,
)
from labsite import roles
from labsite.errors import Conflict

# --- plans -------------------------------------------------------------------------------


@login_required
def plan_list(request: HttpRequest) -> HttpResponse:
    plans_filter = PlanFilter(
        request.GET, queryset=Plan.objects.select_related("author", "reviewer")
    )
    plans, filter_error = filtered(plans_filter)
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
            plan = services.plan_create(actor=actor_of(request), **form.cleaned_data)
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
            plan = services.plan_update(plan=plan, actor=actor_of(request), **form.cleaned_data)
        except ValidationError as exc:
            add_service_errors(form, exc)
        except (PermissionDenied, Conflict) as exc:
            messages.error(request, f"Could not edit the plan: {error_text(exc)}")
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
            service(plan=plan, actor=actor_of(request), **form.cleaned_data)
        except ValidationError as exc:
            add_service_errors(form, exc)
        except (PermissionDenied, Conflict) as exc:
            messages.error(request, f"Could not do that: {error_text(exc)}")
            return redirect("plan_detail", plan_id=plan.id)
        else:
            messages.success(request, f"Plan {done}.")
            return redirect("plan_detail", plan_id=plan.id)
    plan.refresh_from_db()
    return _plan_page(request, plan, {f"{prefix}_form": form}, status=400)
