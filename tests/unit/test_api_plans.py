"""Plans: markdown sections, the review workflow, and what a decision does to the plan's runs."""

from __future__ import annotations

import pytest

from experiments import services
from experiments.actors import Actor
from experiments.choices import ActorKind, PlanStatus, RunReason, RunStatus
from experiments.models import Plan, PlanEvent, Run, RunEvent

FULL_PLAN = """# Learning-rate study

## Objective
Find a stable learning rate for ResNet-18.

## Compute Setup
local_gpu, 1 GPU per run, 4 in parallel.

## Approach
Baseline first, then the grid.

## Parameters to Sweep
| lr | 0.1, 0.01 |

## Metrics
val_acc (higher is better).

## Success Criteria
val_acc >= 0.85 on 3 seeds.

## Risks & Mitigations
OOM: lower the batch size.

## Estimated Effort
4 runs x 1 GPU x 1 h = 4 GPU-hours.
"""

EXPECTED_SECTIONS = {
    "Objective": "Find a stable learning rate for ResNet-18.",
    "Compute Setup": "local_gpu, 1 GPU per run, 4 in parallel.",
    "Approach": "Baseline first, then the grid.",
    "Parameters to Sweep": "| lr | 0.1, 0.01 |",
    "Metrics": "val_acc (higher is better).",
    "Success Criteria": "val_acc >= 0.85 on 3 seeds.",
    "Risks & Mitigations": "OOM: lower the batch size.",
    "Estimated Effort": "4 runs x 1 GPU x 1 h = 4 GPU-hours.",
}


def _actor(person) -> Actor:
    return Actor(kind=ActorKind.USER, user=person.user)


def _create(person, **body):
    body.setdefault("title", "LR study")
    return person.client.post("/api/plans", body, format="json")


def _pending(person) -> Plan:
    plan = services.plan_create(actor=_actor(person), title="p", raw_markdown=FULL_PLAN)
    return services.plan_submit(plan=plan, actor=_actor(person))


# --- sections ------------------------------------------------------------------------------


def test_create_parses_sections_and_is_a_draft(member):
    response = _create(member, goal="stable lr", session_id=None, raw_markdown=FULL_PLAN)
    assert response.status_code == 201, response.content
    body = response.json()
    plan = Plan.objects.get(pk=body["id"])
    assert body["status"] == plan.status == PlanStatus.DRAFT
    assert plan.sections == body["sections"] == EXPECTED_SECTIONS
    assert plan.session_id == "" and plan.author == member.user and plan.goal == "stable lr"
    assert plan.raw_markdown.strip() == FULL_PLAN.strip()
    [event] = plan.events.all()
    assert (event.from_status, event.to_status, event.actor_user) == ("", "draft", member.user)


def test_numbered_headings_are_recognised(member):
    markdown = (
        "## 1. Objective\nO.\n\n## 2) Compute Setup\nC.\n\n### 3. Approach\nA.\n\n"
        "## 7. Risks and Mitigations\nR.\n\n## 8. Estimated Effort ##\nE.\n"
    )
    plan = Plan.objects.get(pk=_create(member, raw_markdown=markdown).json()["id"])
    assert plan.sections == {
        "Objective": "O.",
        "Compute Setup": "C.",
        "Approach": "A.",
        "Risks & Mitigations": "R.",
        "Estimated Effort": "E.",
    }


def test_multi_line_sections_and_unknown_headings(member):
    markdown = (
        "## Objective\nline one\n\nline two\n## Notes to self\nnot a section\n"
        "## Metrics\n- loss\n- acc\n"
    )
    plan = Plan.objects.get(pk=_create(member, raw_markdown=markdown).json()["id"])
    assert plan.sections == {"Objective": "line one\n\nline two", "Metrics": "- loss\n- acc"}


def test_code_block_comments_stay_in_their_section(member):
    """GIVEN an Approach section with a fenced bash block whose lines start with `#`
    WHEN the plan is saved THEN the block (and what follows it) is still part of Approach.

    Plan-mode agents put command shapes in code blocks; a shell comment is not a heading.
    """
    markdown = (
        "## Approach\nBaseline first:\n\n```bash\n# baseline\npython train.py --lr=0.1\n```\n\n"
        "Then the grid.\n\n## Metrics\nval_acc\n"
    )
    plan = Plan.objects.get(pk=_create(member, raw_markdown=markdown).json()["id"])
    assert plan.sections["Metrics"] == "val_acc"
    approach = plan.sections["Approach"]
    assert "# baseline" in approach
    assert "python train.py --lr=0.1" in approach
    assert "Then the grid." in approach


# --- workflow ------------------------------------------------------------------------------


def test_submit_moves_draft_to_pending_review(member):
    plan = services.plan_create(actor=_actor(member), title="p")
    response = member.client.post(f"/api/plans/{plan.id}/submit", {}, format="json")
    assert response.status_code == 200 and response.json()["status"] == "pending_review"
    plan.refresh_from_db()
    assert plan.status == PlanStatus.PENDING_REVIEW and plan.submitted_at is not None
    assert plan.events.last().to_status == "pending_review"


def test_approve_releases_held_runs_direct_and_via_sweep(member, pi):
    """GIVEN a plan under review with held runs (plan_id on the run, and runs of a wild and a
    grid sweep tied to the plan), a ready run of the plan, and a held run of another plan
    WHEN a PI approves with a budget THEN exactly the plan's held runs are queued, each with
    a RunEvent by the PI."""
    a = _actor(member)
    plan, unrelated = _pending(member), _pending(member)
    direct = services.run_create(actor=a, command="x", plan=plan, auto_start=True)
    wild = services.sweep_create_wild(actor=a, name="w", plan=plan)
    via_wild = services.run_create(actor=a, command="x", sweep=wild, auto_start=True)
    grid = services.sweep_create_grid(
        actor=a, name="g", base_command="x", parameters={"s": [1, 2]}, plan=plan, auto_start=True
    )
    via_grid = list(grid.runs.all())
    ready = services.run_create(actor=a, command="x", plan=plan)
    other_held = services.run_create(actor=a, command="x", plan=unrelated, auto_start=True)
    released = [direct, via_wild, *via_grid]
    assert {r.status for r in released} == {RunStatus.HELD}

    response = pi.client.post(
        f"/api/plans/{plan.id}/approve",
        {"comment": "go ahead", "gpu_hours_budget": 12.5},
        format="json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "approved" and body["reviewer"] == "carol"
    plan.refresh_from_db()
    assert plan.status == PlanStatus.APPROVED
    assert plan.reviewer == pi.user and plan.decided_at is not None
    assert plan.review_comment == "go ahead" and plan.gpu_hours_budget == 12.5
    assert plan.events.last().comment == "go ahead"

    for run in released:
        run.refresh_from_db()
        assert run.status == RunStatus.QUEUED and run.queued_at is not None
        event = run.events.last()
        assert (event.from_status, event.to_status, event.reason) == (
            "held",
            "queued",
            "plan_approved",
        )
        assert event.actor_user == pi.user
    ready.refresh_from_db()
    other_held.refresh_from_db()
    assert ready.status == RunStatus.READY
    assert other_held.status == RunStatus.HELD


def test_reject_stops_waiting_runs(member, pi):
    a = _actor(member)
    plan = _pending(member)
    held = services.run_create(actor=a, command="x", plan=plan, auto_start=True)
    ready = services.run_create(actor=a, command="x", plan=plan)
    sweep = services.sweep_create_wild(actor=a, name="w", plan=plan)
    via_sweep = services.run_create(actor=a, command="x", sweep=sweep, auto_start=True)
    unrelated = services.run_create(actor=a, command="x", auto_start=True)

    response = pi.client.post(
        f"/api/plans/{plan.id}/reject", {"comment": "too costly"}, format="json"
    )
    assert response.status_code == 200 and response.json()["status"] == "rejected"
    plan.refresh_from_db()
    assert plan.status == PlanStatus.REJECTED and plan.reviewer == pi.user
    assert plan.review_comment == "too costly" and plan.decided_at is not None
    for run in (held, ready, via_sweep):
        run.refresh_from_db()
        assert (run.status, run.reason) == (RunStatus.STOPPED, RunReason.PLAN_REJECTED)
        event = run.events.last()
        assert event.to_status == "stopped" and "too costly" in event.message
        assert event.actor_user == pi.user
    unrelated.refresh_from_db()
    assert unrelated.status == RunStatus.QUEUED


def test_request_changes_needs_a_comment_then_author_edits_and_resubmits(member, pi):
    plan = _pending(member)
    events = plan.events.count()
    response = pi.client.post(f"/api/plans/{plan.id}/request-changes", {}, format="json")
    assert response.status_code == 400 and response.json()["detail"].startswith("comment")
    blank = pi.client.post(
        f"/api/plans/{plan.id}/request-changes", {"comment": "  "}, format="json"
    )
    assert blank.status_code == 400
    plan.refresh_from_db()
    assert plan.status == PlanStatus.PENDING_REVIEW and plan.events.count() == events

    response = pi.client.post(
        f"/api/plans/{plan.id}/request-changes", {"comment": "add seeds"}, format="json"
    )
    assert response.status_code == 200 and response.json()["status"] == "changes_requested"
    plan.refresh_from_db()
    assert plan.status == PlanStatus.CHANGES_REQUESTED and plan.review_comment == "add seeds"

    edit = member.client.patch(
        f"/api/plans/{plan.id}",
        {"raw_markdown": "## Objective\nNow with 3 seeds.\n"},
        format="json",
    )
    assert edit.status_code == 200, edit.content
    plan.refresh_from_db()
    assert plan.sections == {"Objective": "Now with 3 seeds."}

    again = member.client.post(f"/api/plans/{plan.id}/submit", {}, format="json")
    assert again.status_code == 200 and again.json()["status"] == "pending_review"
    plan.refresh_from_db()
    assert plan.status == PlanStatus.PENDING_REVIEW
    assert [e.to_status for e in plan.events.all()] == [
        "draft",
        "pending_review",
        "changes_requested",
        "pending_review",
    ]


def test_approving_twice_is_409_with_one_approval_event(member, pi):
    plan = _pending(member)
    first = pi.client.post(f"/api/plans/{plan.id}/approve", {"comment": "ok"}, format="json")
    assert first.status_code == 200
    second = pi.client.post(f"/api/plans/{plan.id}/approve", {"comment": "again"}, format="json")
    assert second.status_code == 409 and "approved" in second.json()["detail"]
    plan.refresh_from_db()
    assert plan.review_comment == "ok"
    assert PlanEvent.objects.filter(plan=plan, to_status=PlanStatus.APPROVED).count() == 1


def test_rejecting_an_approved_plan_is_409_and_runs_keep_going(member, pi):
    plan = _pending(member)
    run = services.run_create(actor=_actor(member), command="x", plan=plan, auto_start=True)
    services.plan_approve(plan=plan, actor=_actor(pi))
    response = pi.client.post(f"/api/plans/{plan.id}/reject", {}, format="json")
    assert response.status_code == 409
    run.refresh_from_db()
    plan.refresh_from_db()
    assert run.status == RunStatus.QUEUED and plan.status == PlanStatus.APPROVED


def test_editing_an_approved_plan_is_409(member, pi):
    plan = _pending(member)
    services.plan_approve(plan=plan, actor=_actor(pi))
    response = member.client.patch(f"/api/plans/{plan.id}", {"title": "sneaky"}, format="json")
    assert response.status_code == 409 and "approved" in response.json()["detail"]
    plan.refresh_from_db()
    assert plan.title == "p" and plan.sections == EXPECTED_SECTIONS


def test_editing_a_pending_plan_is_409(member):
    plan = _pending(member)
    response = member.client.patch(f"/api/plans/{plan.id}", {"goal": "other"}, format="json")
    assert response.status_code == 409
    plan.refresh_from_db()
    assert plan.goal == ""


def test_runs_with_an_approved_plan_are_queued_directly(member, pi):
    plan = _pending(member)
    services.plan_approve(plan=plan, actor=_actor(pi), gpu_hours_budget=4)
    response = member.client.post(
        "/api/runs", {"command": "x", "plan_id": plan.id, "auto_start": True}, format="json"
    )
    assert response.status_code == 201
    run = Run.objects.get(pk=response.json()["id"])
    assert (run.status, run.reason, run.plan_id) == (RunStatus.QUEUED, "", plan.id)
    assert [e.to_status for e in run.events.all()] == ["queued"]


@pytest.mark.parametrize("decision", ["reject", "archive"])
def test_runs_cannot_be_tied_to_a_closed_plan(member, pi, decision):
    """GIVEN a rejected (or archived) plan WHEN a run is created with its plan_id and auto_start
    THEN it is a 400 and nothing is created, as for sweeps.

    Otherwise the run is created `held` behind a plan that can never be approved again
    (neither state is decidable) and waits forever.
    """
    plan = _pending(member)
    if decision == "reject":
        services.plan_reject(plan=plan, actor=_actor(pi))
    else:
        services.plan_archive(plan=plan, actor=_actor(member))
    response = member.client.post(
        "/api/runs", {"command": "x", "plan_id": plan.id, "auto_start": True}, format="json"
    )
    assert response.status_code == 400, response.json()
    assert plan.id in response.json()["detail"]
    assert not Run.objects.exists() and not RunEvent.objects.exists()


def test_plan_list_and_detail(member, pi):
    plan = _pending(member)
    services.plan_approve(plan=plan, actor=_actor(pi), comment="fine")
    listed = member.client.get("/api/plans").json()
    assert [p["id"] for p in listed["results"]] == [plan.id]
    assert listed["results"][0]["status"] == "approved"
    detail = member.client.get(f"/api/plans/{plan.id}").json()
    assert detail["reviewer"] == "carol" and detail["review_comment"] == "fine"
    assert [(e["to_status"], e["actor"]) for e in detail["events"]] == [
        ("draft", "alice"),
        ("pending_review", "alice"),
        ("approved", "carol"),
    ]
    missing = member.client.get("/api/plans/nope")
    assert missing.status_code == 404 and missing.json() == {"detail": "Plan not found: nope"}
