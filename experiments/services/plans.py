"""Plans: drafts, review by a PI, approval that releases held runs, budgets."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from experiments import jobs
from experiments.actors import Actor
from experiments.choices import (
    PLAN_ARCHIVABLE,
    PLAN_DECIDABLE,
    PLAN_SUBMITTABLE,
    PlanStatus,
    RunReason,
    RunStatus,
)
from experiments.markdown import plan_sections
from experiments.models import (
    Plan,
    PlanEvent,
    Run,
)
from experiments.services.runs import runs_transition
from experiments.services.runspec import require_owner
from labsite import roles
from labsite.errors import Conflict


def parse_plan_sections(markdown: str) -> dict[str, str]:
    """The known sections of a plan's markdown, keyed by their canonical names (parsed by
    experiments.markdown, the parser that also renders the plan page)."""
    return plan_sections(markdown or "")


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
    require_owner(actor, plan.author_id, "edit this plan")
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
    """Conditional update + PlanEvent: two PIs deciding at once leave exactly one decision.

    The plan's row is locked (SELECT ... FOR UPDATE) until the caller's transaction ends, the
    lock that run creation takes too (runspec.lock_plan_status): what the caller does next in
    that transaction (release or stop the plan's runs) sees every run created before it.
    """
    sources = list(from_)
    with transaction.atomic():
        current = (
            Plan.objects.select_for_update()
            .filter(pk=plan.pk)
            .values_list("status", flat=True)
            .first()
        )
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
    """A draft (or a plan with changes requested) goes to review."""
    require_owner(actor, plan.author_id, "submit this plan")
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
        .order_by()
        .values_list("id", flat=True)
    )


def plan_approve(
    *, plan: Plan, actor: Actor, comment: str = "", gpu_hours_budget: float | None = None
) -> Plan:
    """Approve, and release the plan's held runs to the queue, in ONE transaction.

    The plan's row stays locked from the decision to the release, and run creation decides
    held or queued under the same lock, so no run created meanwhile is left held (and a crash
    cannot commit the approval without the release). The release is one bulk transition: the
    queries do not grow with the plan's runs.

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
    with transaction.atomic():
        plan = _plan_transition(
            plan=plan,
            to=PlanStatus.APPROVED,
            from_=PLAN_DECIDABLE,
            actor=actor,
            comment=(f"self-approved: {comment}" if comment else "self-approved")
            if own
            else comment,
            fields={
                "reviewer": actor.user,
                "review_comment": comment or "",
                "decided_at": timezone.now(),
                "gpu_hours_budget": gpu_hours_budget,
                "self_approved": own,
            },
        )
        released = runs_transition(
            run_ids=_plan_runs(plan, [RunStatus.HELD]),
            to=RunStatus.QUEUED,
            from_=[RunStatus.HELD],
            actor=actor,
            reason="plan_approved",
            message=f"plan {plan.id} approved",
        )
        if released:
            jobs.kick_scheduler()
    return plan


def plan_reject(*, plan: Plan, actor: Actor, comment: str = "") -> Plan:
    """Reject, and stop the work that was waiting for it (reason plan_rejected), in ONE
    transaction under the plan's lock (as plan_approve), with one bulk transition."""
    _require_pi(actor)
    waiting = [RunStatus.HELD, RunStatus.READY, RunStatus.QUEUED]
    with transaction.atomic():
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
        runs_transition(
            run_ids=_plan_runs(plan, waiting),
            to=RunStatus.STOPPED,
            from_=waiting,
            actor=actor,
            reason=RunReason.PLAN_REJECTED,
            message=f"plan {plan.id} rejected: {comment}"[:500],
        )
    return plan


def plan_request_changes(*, plan: Plan, actor: Actor, comment: str = "") -> Plan:
    """A PI sends the plan back to its author with the changes they want."""
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
    """Put a plan away (not while it is executing)."""
    require_owner(actor, plan.author_id, "archive this plan")
    return _plan_transition(
        plan=plan, to=PlanStatus.ARCHIVED, from_=PLAN_ARCHIVABLE, actor=actor, comment=comment
    )
