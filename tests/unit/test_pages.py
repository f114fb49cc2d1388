"""The browser pages: who sees what, and that forms reach the services and change the database."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from experiments import services
from experiments.actors import Actor
from experiments.choices import PlanStatus, RunStatus
from experiments.models import GpuLease, Plan, PlanEvent, Run, RunEvent
from labsite.models import ApiToken
from tests.factories import GpuFactory, HostFactory, SweepFactory

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


def actor(person) -> Actor:
    return Actor(kind="user", user=person.user)


def make_run(person, **kwargs) -> Run:
    return services.run_create(actor=actor(person), command="python train.py", **kwargs)


def pending_plan(person) -> Plan:
    plan = services.plan_create(
        actor=actor(person),
        title="Scaling study",
        goal="Does width help?",
        raw_markdown="## Objective\nFind out.\n\n## Metrics\nval/loss\n",
    )
    return services.plan_submit(plan=plan, actor=actor(person))


def page(client, person):
    client.force_login(person.user)
    return client


# --- login required ----------------------------------------------------------------------


def test_anonymous_is_sent_to_login_from_every_page(client, member):
    run = make_run(member)
    plan = pending_plan(member)
    sweep = SweepFactory(created_by=member.user)
    token, _ = ApiToken.issue(member.user)
    gets = [
        reverse("dashboard"),
        reverse("run_new"),
        reverse("run_detail", args=[run.id]),
        reverse("sweep_list"),
        reverse("sweep_detail", args=[sweep.id]),
        reverse("plan_list"),
        reverse("plan_new"),
        reverse("plan_detail", args=[plan.id]),
        reverse("plan_edit", args=[plan.id]),
        reverse("cluster_board"),
        reverse("token_list"),
    ]
    posts = [
        reverse("run_stop", args=[run.id]),
        reverse("run_start", args=[run.id]),
        reverse("run_rerun", args=[run.id]),
        reverse("plan_approve", args=[plan.id]),
        reverse("plan_reject", args=[plan.id]),
        reverse("token_create"),
        reverse("token_revoke", args=[token.id]),
    ]
    login = reverse("login")
    for url in gets:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(f"{login}?next="), url
    for url in posts:
        response = client.post(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(f"{login}?next="), url
    # Nothing moved.
    run.refresh_from_db()
    plan.refresh_from_db()
    token.refresh_from_db()
    assert run.status == RunStatus.READY
    assert plan.status == PlanStatus.PENDING_REVIEW
    assert not token.revoked
    assert Run.objects.count() == 1
    assert client.get(login).status_code == 200


def test_expired_session_poll_sends_the_whole_page_to_login(client, member):
    """GIVEN a dashboard left open WHEN its session ends THEN the next 3 s poll answers with
    HX-Redirect to the login form (not a login form swapped into the runs table)."""
    response = client.get(
        reverse("dashboard"),
        {"status": "queued"},
        HTTP_HX_REQUEST="true",
        HTTP_HX_CURRENT_URL="http://testserver/?status=queued",
    )
    assert response.status_code == 200
    assert response["HX-Redirect"] == "/login?next=/%3Fstatus%3Dqueued"
    assert response.content == b""


def test_login_form_signs_in_and_lands_on_dashboard(client, member):
    response = client.post(reverse("login"), {"username": "alice", "password": "pw-for-tests-only"})
    assert response.status_code == 302
    assert response["Location"] == reverse("dashboard")
    assert "alice" in client.get(reverse("dashboard")).content.decode()


def test_logout_is_a_post(client, member):
    page(client, member)
    response = client.post(reverse("logout"))
    assert response.status_code == 302
    assert client.get(reverse("dashboard")).status_code == 302


# --- runs ---------------------------------------------------------------------------------


def test_member_creates_a_run_through_the_form_and_sees_it(client, member):
    page(client, member)
    form = client.get(reverse("run_new")).content.decode()
    assert 'name="command"' in form and 'name="auto_start"' in form

    response = client.post(
        reverse("run_new"),
        {
            "name": "baseline",
            "command": "python train.py --lr 3e-4",
            "workdir": "~/proj",
            "gpus": "1",
            "pin_gpus": "on",
            "auto_start": "on",
        },
    )
    run = Run.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("run_detail", args=[run.id])
    assert run.name == "baseline"
    assert run.command == "python train.py --lr 3e-4"
    assert run.created_by == member.user
    assert run.status == RunStatus.QUEUED
    assert run.gpus == 1 and run.gpuwrap_config["enabled"] is True
    event = run.events.get()
    assert (event.to_status, event.actor_user, event.actor_kind) == ("queued", member.user, "user")

    detail = client.get(response["Location"]).content.decode()
    assert "baseline" in detail and "python train.py --lr 3e-4" in detail
    assert "Queued" in detail and "created" in detail  # status block and audit trail
    dashboard = client.get(reverse("dashboard")).content.decode()
    assert reverse("run_detail", args=[run.id]) in dashboard
    assert 'hx-trigger="every 3s"' in dashboard


def test_run_without_auto_start_is_ready_and_can_be_started(client, member):
    page(client, member)
    client.post(reverse("run_new"), {"command": "echo hi", "gpus": "0"})
    run = Run.objects.get()
    assert run.status == RunStatus.READY
    assert run.name == "echo"
    client.post(reverse("run_start", args=[run.id]))
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED


def test_run_under_unapproved_plan_is_held(client, member):
    plan = pending_plan(member)
    page(client, member)
    client.post(
        reverse("run_new"),
        {"command": "python train.py", "gpus": "0", "plan": plan.id, "auto_start": "on"},
    )
    run = Run.objects.get()
    assert run.status == RunStatus.HELD and run.plan == plan


@pytest.mark.parametrize(
    "data, field, message",
    [
        ({"command": "   ", "gpus": "0"}, "command", "This field is required"),
        ({"command": "python x.py", "gpus": "-1"}, "gpus", "greater than or equal to 0"),
        ({"command": "python x.py", "gpus": "0", "plan": "nope"}, "plan", "Select a valid choice"),
    ],
)
def test_bad_run_form_shows_an_error_and_creates_nothing(client, member, data, field, message):
    page(client, member)
    response = client.post(reverse("run_new"), data)
    assert response.status_code == 200
    body = response.content.decode()
    assert message in body
    assert "has-error" in body
    assert field in response.context["form"].errors
    assert not Run.objects.exists()
    assert not RunEvent.objects.exists()


def test_service_validation_error_lands_on_the_form(client, member, settings):
    """GIVEN a lab that requires a plan for GPU work WHEN a run asks for a GPU without one
    THEN the service's error shows on the plan field and nothing is created."""
    settings.LABSITE = {**settings.LABSITE, "REQUIRE_PLAN_FOR_GPU_WORK": True}
    page(client, member)
    response = client.post(reverse("run_new"), {"command": "python x.py", "gpus": "2"})
    assert response.status_code == 200
    assert "requires a plan for GPU work" in response.content.decode()
    assert "plan" in response.context["form"].errors
    assert not Run.objects.exists()


def test_member_cannot_stop_another_members_run(client, member, other):
    run = make_run(other, auto_start=True)
    page(client, member)
    detail = client.get(reverse("run_detail", args=[run.id])).content.decode()
    stop_url = reverse("run_stop", args=[run.id])
    assert stop_url not in detail
    assert ">Stop<" not in detail

    response = client.post(stop_url, follow=True)
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED
    assert run.events.count() == 1
    body = response.content.decode()
    assert "Could not stop run" in body
    assert "only its owner, a PI or an admin" in body


def test_owner_stops_own_run_and_pi_stops_anyones(client, member, pi):
    mine = make_run(member, auto_start=True)
    page(client, member)
    detail = client.get(reverse("run_detail", args=[mine.id])).content.decode()
    assert reverse("run_stop", args=[mine.id]) in detail
    client.post(reverse("run_stop", args=[mine.id]))
    mine.refresh_from_db()
    assert mine.status == RunStatus.STOPPED
    assert mine.events.last().actor_user == member.user

    theirs = make_run(member, auto_start=True)
    page(client, pi)
    client.post(reverse("run_stop", args=[theirs.id]))
    theirs.refresh_from_db()
    assert theirs.status == RunStatus.STOPPED
    assert theirs.events.last().actor_user == pi.user


def test_stopping_a_stopped_run_is_a_message_not_a_500(client, member):
    run = make_run(member, auto_start=True)
    services.run_stop(run=run, actor=actor(member))
    page(client, member)
    response = client.post(reverse("run_stop", args=[run.id]), follow=True)
    assert response.status_code == 200
    assert "already stopped" in response.content.decode()


def test_rerun_creates_a_linked_run(client, member):
    run = make_run(member, auto_start=True, name="orig")
    page(client, member)
    response = client.post(reverse("run_rerun", args=[run.id]))
    new = Run.objects.exclude(pk=run.pk).get()
    assert response["Location"] == reverse("run_detail", args=[new.id])
    assert new.parent == run and new.status == RunStatus.QUEUED and new.name == "orig"


def test_status_partial_polls_until_terminal_then_answers_286(client, member):
    run = make_run(member, auto_start=True)
    page(client, member)
    url = reverse("run_detail", args=[run.id])

    live = client.get(url, **HTMX)
    assert live.status_code == 200
    assert "<html" not in live.content.decode()
    assert "Queued" in live.content.decode()
    assert 'hx-trigger="every 3s"' in client.get(url).content.decode()

    services.run_stop(run=run, actor=actor(member))
    done = client.get(url, **HTMX)
    assert done.status_code == 286
    body = done.content.decode()
    assert "Stopped" in body and "user_stop" in body
    assert reverse("run_stop", args=[run.id]) not in body
    # A terminal run's full page does not poll at all.
    assert 'hx-trigger="every 3s"' not in client.get(url).content.decode()


def test_unknown_run_is_404(client, member):
    page(client, member)
    assert client.get(reverse("run_detail", args=["nope"])).status_code == 404


# --- dashboard ----------------------------------------------------------------------------


def test_dashboard_counts_filters_and_partial(client, member, other):
    sweep = SweepFactory(created_by=member.user, name="lr-sweep")
    queued = make_run(member, auto_start=True, name="queued-one", sweep=sweep)
    ready = make_run(other, name="ready-one")
    page(client, member)

    full = client.get(reverse("dashboard"))
    assert full.context["health"]["queued"] == 1 and full.context["health"]["ready"] == 1
    body = full.content.decode()
    assert "queued-one" in body and "ready-one" in body and "lr-sweep" in body
    assert body.index("ready-one") < body.index("queued-one")  # newest first

    filtered = client.get(reverse("dashboard"), {"status": "queued"}).content.decode()
    assert "queued-one" in filtered and "ready-one" not in filtered
    by_sweep = client.get(reverse("dashboard"), {"sweep_id": sweep.id}).content.decode()
    assert "queued-one" in by_sweep and "ready-one" not in by_sweep

    partial = client.get(reverse("dashboard"), {"status": "ready"}, **HTMX)
    text = partial.content.decode()
    assert partial.status_code == 200
    assert "<html" not in text and "ready-one" in text and "queued-one" not in text
    assert 'hx-swap-oob="true"' in text  # the counts strip refreshes with the table

    bad = client.get(reverse("dashboard"), {"status": "bogus"})
    assert bad.status_code == 200
    assert "unknown status bogus" in bad.content.decode()
    assert queued.id not in bad.content.decode() and ready.id not in bad.content.decode()


def test_dashboard_paginates_by_50_in_a_fixed_number_of_queries(client, member):
    page(client, member)
    for i in range(3):
        make_run(member, name=f"r{i}")
    with CaptureQueriesContext(connection) as few:
        client.get(reverse("dashboard"), **HTMX)
    for i in range(3, 55):
        make_run(member, name=f"r{i}")
    with CaptureQueriesContext(connection) as many:
        response = client.get(reverse("dashboard"), **HTMX)
    assert len(many) == len(few)
    assert len(response.context["page"].object_list) == 50
    second = client.get(reverse("dashboard"), {"page": 2})
    assert len(second.context["page"].object_list) == 5


# --- plans --------------------------------------------------------------------------------


def test_pi_approves_a_plan_from_its_page_and_held_runs_queue(client, member, pi):
    plan = pending_plan(member)
    held = make_run(member, plan=plan, auto_start=True)
    assert held.status == RunStatus.HELD

    page(client, member)
    assert (
        reverse("plan_approve", args=[plan.id])
        not in client.get(reverse("plan_detail", args=[plan.id])).content.decode()
    )

    page(client, pi)
    detail = client.get(reverse("plan_detail", args=[plan.id])).content.decode()
    assert reverse("plan_approve", args=[plan.id]) in detail
    assert "<h3>Objective</h3>" in detail and "## Objective" in detail

    response = client.post(
        reverse("plan_approve", args=[plan.id]),
        {"approve-comment": "Go ahead.", "approve-gpu_hours_budget": "120"},
        follow=True,
    )
    plan.refresh_from_db()
    held.refresh_from_db()
    assert plan.status == PlanStatus.APPROVED
    assert plan.reviewer == pi.user
    assert plan.gpu_hours_budget == 120
    assert plan.review_comment == "Go ahead."
    assert held.status == RunStatus.QUEUED
    assert held.events.last().reason == "plan_approved"
    body = response.content.decode()
    assert "Plan approved." in body and "Go ahead." in body and "120 GPU-hours" in body


def test_member_cannot_approve_by_forged_post(client, member, other):
    plan = pending_plan(member)
    page(client, other)
    response = client.post(reverse("plan_approve", args=[plan.id]), follow=True)
    plan.refresh_from_db()
    assert plan.status == PlanStatus.PENDING_REVIEW
    assert "only a PI may decide on plans" in response.content.decode()


def test_request_changes_needs_a_comment(client, member, pi):
    plan = pending_plan(member)
    page(client, pi)
    response = client.post(reverse("plan_request_changes", args=[plan.id]), {"changes-comment": ""})
    assert response.status_code == 400
    assert "This field is required" in response.content.decode()
    plan.refresh_from_db()
    assert plan.status == PlanStatus.PENDING_REVIEW

    client.post(
        reverse("plan_request_changes", args=[plan.id]), {"changes-comment": "Add a baseline."}
    )
    plan.refresh_from_db()
    assert plan.status == PlanStatus.CHANGES_REQUESTED
    assert plan.review_comment == "Add a baseline."


def test_pi_rejects_and_waiting_runs_stop(client, member, pi):
    plan = pending_plan(member)
    held = make_run(member, plan=plan, auto_start=True)
    page(client, pi)
    client.post(reverse("plan_reject", args=[plan.id]), {"reject-comment": "Too costly"})
    plan.refresh_from_db()
    held.refresh_from_db()
    assert plan.status == PlanStatus.REJECTED
    assert held.status == RunStatus.STOPPED and held.reason == "plan_rejected"


def test_approving_twice_is_a_message_not_a_500(client, member, pi):
    plan = pending_plan(member)
    page(client, pi)
    client.post(reverse("plan_approve", args=[plan.id]))
    response = client.post(reverse("plan_approve", args=[plan.id]), follow=True)
    assert response.status_code == 200
    assert "cannot move it to approved" in response.content.decode()
    assert PlanEvent.objects.filter(plan=plan, to_status="approved").count() == 1


def test_author_writes_edits_and_submits_a_plan(client, member):
    page(client, member)
    response = client.post(
        reverse("plan_new"),
        {"title": "Width study", "goal": "g", "raw_markdown": "## Approach\nTry it.\n"},
    )
    plan = Plan.objects.get()
    assert response["Location"] == reverse("plan_detail", args=[plan.id])
    assert plan.author == member.user and plan.status == PlanStatus.DRAFT
    assert plan.sections == {"Approach": "Try it."}

    client.post(
        reverse("plan_edit", args=[plan.id]),
        {"title": "Width study v2", "goal": "g", "raw_markdown": "## Risks\nOOM\n"},
    )
    plan.refresh_from_db()
    assert plan.title == "Width study v2" and plan.sections == {"Risks & Mitigations": "OOM"}

    detail = client.get(reverse("plan_detail", args=[plan.id])).content.decode()
    assert reverse("plan_submit", args=[plan.id]) in detail
    client.post(reverse("plan_submit", args=[plan.id]), {"submit-comment": "ready"})
    plan.refresh_from_db()
    assert plan.status == PlanStatus.PENDING_REVIEW


def test_plan_without_title_is_a_form_error(client, member):
    page(client, member)
    response = client.post(reverse("plan_new"), {"title": "", "raw_markdown": "x"})
    assert "This field is required" in response.content.decode()
    assert not Plan.objects.exists()


def test_plan_list_filters_by_status(client, member):
    pending_plan(member)
    services.plan_create(actor=actor(member), title="Just a draft")
    page(client, member)
    body = client.get(reverse("plan_list"), {"status": "draft"}).content.decode()
    assert "Just a draft" in body and "Scaling study" not in body


# --- sweeps -------------------------------------------------------------------------------


def test_sweeps_list_and_detail(client, member):
    sweep = services.sweep_create_grid(
        actor=actor(member),
        name="lr",
        base_command="python train.py",
        parameters={"lr": [0.1, 0.01], "seed": [1]},
        auto_start=True,
    )
    page(client, member)
    listing = client.get(reverse("sweep_list")).content.decode()
    assert "lr" in listing and "0 / 2 done" in listing and "badge-queued" in listing
    detail = client.get(reverse("sweep_detail", args=[sweep.id])).content.decode()
    for run in sweep.runs.all():
        assert reverse("run_detail", args=[run.id]) in detail
    assert "0.01" in detail and "seed" in detail


# --- cluster ------------------------------------------------------------------------------


def test_cluster_board_shows_gpus_and_cpu_hosts(client, member):
    gpu_host = HostFactory(name="gpu-node-1", state="online")
    free = GpuFactory(host=gpu_host, index=0)
    leased = GpuFactory(host=gpu_host, index=1, memory_used_mb=40960, utilization_pct=97)
    GpuFactory(host=gpu_host, index=2, processes=[{"pid": 42, "used_memory_mb": 900}])
    HostFactory(
        name="cpu-box", state="online", state_note="CPU host: 32 cores, no GPU", cpu_count=32
    )
    run = make_run(member, auto_start=True)
    GpuLease.objects.create(gpu=leased, run=run)
    page(client, member)

    body = client.get(reverse("cluster_board")).content.decode()
    assert 'hx-trigger="every 5s"' in body
    assert "gpu-node-1" in body and "cpu-box" in body
    assert "CPU host: 32 cores, no GPU" in body
    assert body.count('class="gpu gpu-') == 3
    assert "gpu-free" in body and "gpu-leased" in body and "gpu-busy_foreign" in body
    assert reverse("run_detail", args=[run.id]) in body
    assert "40.0 / 80 GiB" in body and "97% util" in body
    assert "0 of 32 CPU slots in use" in body, "each host's CPU slots, as the scheduler counts"
    assert "CPU slots not read yet" in body  # gpu-node-1: no inventory of its cores yet

    partial = client.get(reverse("cluster_board"), **HTMX).content.decode()
    assert "<html" not in partial and "gpu-node-1" in partial
    assert free.uuid in body


# --- tokens -------------------------------------------------------------------------------


def test_token_is_shown_once_and_can_be_revoked(client, member, other):
    page(client, member)
    before = set(ApiToken.objects.filter(user=member.user).values_list("pk", flat=True))
    response = client.post(reverse("token_create"), {"name": "laptop"})
    token = ApiToken.objects.filter(user=member.user).exclude(pk__in=before).get()
    raw = response.context["raw"]
    body = response.content.decode()
    assert token.user == member.user and token.name == "laptop"
    assert raw.startswith(token.prefix) and raw in body
    assert f"X-Auth-Token: {raw}" in body and "curl" in body
    assert "no-store" in response["Cache-Control"]

    listing = client.get(reverse("token_list")).content.decode()
    assert token.prefix in listing and raw not in listing

    # Another member's token cannot be revoked from here.
    theirs = ApiToken.objects.filter(user=other.user).get()
    client.post(reverse("token_revoke", args=[theirs.id]))
    theirs.refresh_from_db()
    assert not theirs.revoked

    client.post(reverse("token_revoke", args=[token.id]))
    token.refresh_from_db()
    assert token.revoked
    api = client.get("/api/runs", HTTP_X_AUTH_TOKEN=raw)
    assert api.status_code == 401
