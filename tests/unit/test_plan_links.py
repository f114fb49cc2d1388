"""Work goes under a plan or a sweep only by its owner, a PI or an admin; PIs approving their
own plans are recorded as such, and a lab may forbid it (issue 9, item 2)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from experiments import services
from experiments.actors import Actor
from experiments.choices import ActorKind, PlanStatus, RunStatus
from experiments.models import Plan, PlanEvent, Run, RunEvent, Sweep


def _actor(person) -> Actor:
    return Actor(kind=ActorKind.USER, user=person.user)


@pytest.fixture
def approved(member, pi) -> Plan:
    """alice's plan, approved by carol with a GPU-hour budget."""
    plan = services.plan_create(actor=_actor(member), title="alice's plan")
    plan = services.plan_submit(plan=plan, actor=_actor(member))
    return services.plan_approve(plan=plan, actor=_actor(pi), gpu_hours_budget=10)


def _nothing_created(runs: int = 0, sweeps: int = 0) -> None:
    assert Run.objects.count() == runs and RunEvent.objects.count() == runs
    assert Sweep.objects.count() == sweeps


def _assert_refused(response, what: str) -> None:
    assert response.status_code == 403, response.content
    detail = response.json()["detail"]
    assert what in detail and "not yours" in detail and "owner, a PI or an admin" in detail


# --- borrowing is refused ------------------------------------------------------------------


def test_a_member_cannot_queue_a_run_under_anothers_approved_plan(other, approved):
    """GIVEN alice's approved plan WHEN bob creates a run with its plan_id and auto_start
    THEN 403: without the check it was queued at once, unreviewed, on alice's budget."""
    response = other.client.post(
        "/api/runs",
        {"command": "python train.py", "plan_id": approved.id, "auto_start": True, "gpus": 1},
        format="json",
    )
    _assert_refused(response, f"plan {approved.id}")
    _nothing_created()


def test_a_borrowed_plan_does_not_satisfy_require_plan_for_gpu_work(other, approved, settings):
    settings.LABSITE = {**settings.LABSITE, "REQUIRE_PLAN_FOR_GPU_WORK": True}
    response = other.client.post(
        "/api/runs",
        {"command": "python train.py", "plan_id": approved.id, "gpus": 1, "auto_start": True},
        format="json",
    )
    _assert_refused(response, "plan")
    _nothing_created()


def test_a_member_cannot_open_a_wild_sweep_under_anothers_plan(other, approved):
    response = other.client.post(
        "/api/sweeps/wild", {"name": "borrowed", "plan_id": approved.id}, format="json"
    )
    _assert_refused(response, f"plan {approved.id}")
    _nothing_created()


def test_a_member_cannot_expand_a_grid_under_anothers_plan(other, approved):
    response = other.client.post(
        "/api/sweeps",
        {
            "name": "g",
            "base_command": "python train.py",
            "parameters": {"lr": [0.1, 0.01]},
            "plan_id": approved.id,
            "auto_start": True,
        },
        format="json",
    )
    _assert_refused(response, f"plan {approved.id}")
    _nothing_created()


def test_a_member_cannot_add_runs_to_anothers_sweep(member, other, approved):
    """GIVEN alice's wild sweep under her approved plan WHEN bob posts a run with its sweep_id
    THEN 403, and the sweep keeps only alice's runs."""
    sweep = services.sweep_create_wild(actor=_actor(member), name="alice's", plan=approved)
    response = other.client.post(
        "/api/runs",
        {"command": "python train.py", "sweep_id": sweep.id, "auto_start": True},
        format="json",
    )
    _assert_refused(response, f"sweep {sweep.id}")
    _nothing_created(sweeps=1)


def test_a_member_cannot_add_runs_to_anothers_plain_sweep(member, other):
    sweep = services.sweep_create_wild(actor=_actor(member), name="alice's, no plan")
    response = other.client.post("/api/runs", {"command": "x", "sweep_id": sweep.id}, format="json")
    _assert_refused(response, f"sweep {sweep.id}")
    _nothing_created(sweeps=1)


def test_the_run_form_shows_the_refusal(client, other, approved):
    """The page's form goes through the same service: an error on the form, never a 500."""
    client.force_login(other.user)
    response = client.post(
        reverse("run_new"),
        {"command": "python train.py", "gpus": "0", "plan": approved.id, "auto_start": "on"},
    )
    assert response.status_code == 200
    assert "not yours" in response.content.decode()
    _nothing_created()


# --- owners, PIs and admins still may ------------------------------------------------------


@pytest.mark.parametrize("who", ["member", "pi", "admin"])
def test_owner_pi_and_admin_may_link_work(request, who, member, approved):
    person = request.getfixturevalue(who)
    sweep = services.sweep_create_wild(actor=_actor(member), name="alice's", plan=approved)
    run = person.client.post(
        "/api/runs",
        {"command": "x", "plan_id": approved.id, "sweep_id": sweep.id, "auto_start": True},
        format="json",
    )
    assert run.status_code == 201, run.content
    assert run.json()["status"] == RunStatus.QUEUED
    wild = person.client.post(
        "/api/sweeps/wild", {"name": "w", "plan_id": approved.id}, format="json"
    )
    assert wild.status_code == 201, wild.content
    grid = person.client.post(
        "/api/sweeps",
        {"name": "g", "base_command": "x", "parameters": {"a": [1, 2]}, "plan_id": approved.id},
        format="json",
    )
    assert grid.status_code == 201, grid.content


def test_the_owner_can_rerun_a_run_of_their_sweep_and_plan(member, approved):
    sweep = services.sweep_create_wild(actor=_actor(member), name="mine", plan=approved)
    run = services.run_create(actor=_actor(member), command="x", sweep=sweep, plan=approved)
    response = member.client.post(f"/api/runs/{run.id}/rerun")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["parent_id"] == run.id and body["status"] == RunStatus.QUEUED
    assert (body["sweep_id"], body["plan_id"]) == (sweep.id, approved.id)


# --- self-approval -------------------------------------------------------------------------


def _pi_plan(pi) -> Plan:
    plan = services.plan_create(actor=_actor(pi), title="carol's own plan")
    return services.plan_submit(plan=plan, actor=_actor(pi))


def test_a_pi_approving_their_own_plan_is_recorded_as_self_approved(pi):
    plan = _pi_plan(pi)
    response = pi.client.post(f"/api/plans/{plan.id}/approve", {"comment": "go"}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "approved" and body["self_approved"] is True
    assert body["events"][-1]["comment"] == "self-approved: go"
    listed = {p["id"]: p for p in pi.client.get("/api/plans").json()["results"]}
    assert listed[plan.id]["self_approved"] is True
    plan.refresh_from_db()
    assert plan.self_approved and plan.review_comment == "go"
    event = PlanEvent.objects.filter(plan=plan).last()
    assert event.to_status == "approved" and event.comment == "self-approved: go"


def test_another_pis_approval_is_not_self_approved(member, pi):
    plan = services.plan_submit(
        plan=services.plan_create(actor=_actor(member), title="p"), actor=_actor(member)
    )
    body = pi.client.post(f"/api/plans/{plan.id}/approve", {}, format="json").json()
    assert body["status"] == "approved" and body["self_approved"] is False
    assert body["events"][-1]["comment"] == ""


def test_self_approval_is_refused_where_the_lab_forbids_it(pi, settings):
    settings.LABSITE = {**settings.LABSITE, "PI_SELF_APPROVAL": False}
    plan = _pi_plan(pi)
    response = pi.client.post(f"/api/plans/{plan.id}/approve", {}, format="json")
    assert response.status_code == 403, response.content
    assert "LABSITE_PI_SELF_APPROVAL" in response.json()["detail"]
    plan.refresh_from_db()
    assert plan.status == PlanStatus.PENDING_REVIEW and not plan.self_approved
    assert not PlanEvent.objects.filter(plan=plan, to_status="approved").exists()


def test_the_plan_page_shows_the_refusal(client, pi, settings):
    settings.LABSITE = {**settings.LABSITE, "PI_SELF_APPROVAL": False}
    plan = _pi_plan(pi)
    client.force_login(pi.user)
    response = client.post(reverse("plan_approve", args=[plan.id]), follow=True)
    assert response.status_code == 200
    assert "LABSITE_PI_SELF_APPROVAL" in response.content.decode()
    plan.refresh_from_db()
    assert plan.status == PlanStatus.PENDING_REVIEW
