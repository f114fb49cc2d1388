"""POST/GET /api/runs and the run actions, as agents call them (AGENT_API.md)."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from experiments import services
from experiments.actors import Actor
from experiments.choices import ActorKind, PlanStatus, RunReason, RunStatus
from experiments.models import GpuLease, Run, RunEvent
from tests.factories import GpuFactory, HostFactory, RunFactory


def _actor(person) -> Actor:
    return Actor(kind=ActorKind.USER, user=person.user)


def _create(person, **body):
    return person.client.post("/api/runs", body, format="json")


def _plan(person, status=PlanStatus.PENDING_REVIEW):
    plan = services.plan_create(actor=_actor(person), title="a plan")
    if status != PlanStatus.DRAFT:
        plan = services.plan_submit(plan=plan, actor=_actor(person))
    return plan


# --- create ---------------------------------------------------------------------------


def test_create_with_auto_start_is_queued(member):
    response = _create(member, name="r1", command="python train.py", auto_start=True)
    assert response.status_code == 201
    body = response.json()
    run = Run.objects.get(pk=body["id"])
    assert body["status"] == run.status == RunStatus.QUEUED
    assert run.queued_at is not None and run.created_by == member.user
    [event] = run.events.all()
    assert (event.from_status, event.to_status, event.reason) == ("", "queued", "created")
    assert event.actor_kind == ActorKind.AGENT and event.actor_user == member.user


def test_create_without_auto_start_is_ready(member):
    response = _create(member, command="python train.py --lr=0.1")
    assert response.status_code == 201
    run = Run.objects.get(pk=response.json()["id"])
    assert response.json()["status"] == run.status == RunStatus.READY
    assert run.queued_at is None
    assert run.name == "python"  # no name: the command's first word


def test_create_behind_unapproved_plan_is_held(member):
    plan = _plan(member)
    response = _create(member, command="python train.py", plan_id=plan.id, auto_start=True)
    assert response.status_code == 201
    run = Run.objects.get(pk=response.json()["id"])
    assert run.status == RunStatus.HELD and run.plan_id == plan.id
    assert run.reason == RunReason.PLAN_NOT_APPROVED
    assert response.json()["reason"] == "plan_not_approved"
    assert run.held_at is not None and run.queued_at is None


def test_create_in_sweep_linked_to_unapproved_plan_is_held(member):
    """GIVEN a wild sweep tied to a plan under review WHEN a run is added with sweep_id
    (no plan_id of its own) THEN it waits for the plan too."""
    plan = _plan(member)
    sweep = services.sweep_create_wild(actor=_actor(member), name="w", plan=plan)
    response = _create(member, command="python train.py", sweep_id=sweep.id, auto_start=True)
    assert response.status_code == 201
    run = Run.objects.get(pk=response.json()["id"])
    assert run.status == RunStatus.HELD and run.sweep_id == sweep.id


@pytest.mark.parametrize(
    ("gpuwrap", "gpus", "expected"),
    [
        ({"enabled": True, "retries": -1, "retry_delay_seconds": 30}, None, 1),
        ({"enabled": False}, None, 0),
        (None, None, 0),
        ({"enabled": True}, 2, 2),
        ({"enabled": True}, 0, 0),
    ],
)
def test_gpus_default_follows_gpuwrap(member, gpuwrap, gpus, expected):
    body = {"command": "python train.py"}
    if gpuwrap is not None:
        body["gpuwrap_config"] = gpuwrap
    if gpus is not None:
        body["gpus"] = gpus
    response = _create(member, **body)
    assert response.status_code == 201, response.content
    run = Run.objects.get(pk=response.json()["id"])
    assert run.gpus == response.json()["gpus"] == expected


def test_gpuwrap_config_is_stored_with_defaults_filled(member):
    response = _create(member, command="x", gpuwrap_config={"enabled": True, "retries": 3})
    run = Run.objects.get(pk=response.json()["id"])
    assert run.gpuwrap_config == {"enabled": True, "retries": 3, "retry_delay_seconds": 30}


BAD_BODIES = [
    pytest.param({"command": "x", "sweep_id": "nope"}, "Sweep not found: nope", id="unknown-sweep"),
    pytest.param({"command": "x", "plan_id": "nope"}, "Plan not found: nope", id="unknown-plan"),
    pytest.param({"command": ""}, "command", id="empty-command"),
    pytest.param({"command": "   \t "}, "command", id="whitespace-command"),
    pytest.param({"name": "no command"}, "command", id="missing-command"),
    pytest.param({"command": "x", "gpus": -1}, "gpus", id="negative-gpus"),
    pytest.param(
        {"command": "x", "host": "no-such-host"}, "Host not found: no-such-host", id="unknown-host"
    ),
    pytest.param(
        {"command": "x", "gpuwrap_config": {"enabled": True, "gpu_ids": [0]}},
        "gpu_ids",
        id="unknown-gpuwrap-field",
    ),
    pytest.param(
        {"command": "x", "gpuwrap_config": {"enabled": True, "retries": -2}},
        "retries",
        id="gpuwrap-retries-below-minus-one",
    ),
    pytest.param(
        {"command": "x", "gpuwrap_config": {"enabled": "yes"}},
        "enabled",
        id="gpuwrap-enabled-not-bool",
    ),
    pytest.param(
        {"command": "x", "gpuwrap_config": "on"}, "gpuwrap_config", id="gpuwrap-not-object"
    ),
    pytest.param({"command": "x", "env": {"BAD-NAME": "1"}}, "BAD-NAME", id="env-bad-name"),
    pytest.param({"command": "x", "env": {"1ST": "1"}}, "1ST", id="env-name-starts-digit"),
    pytest.param({"command": "x", "env": ["A=1"]}, "env", id="env-not-object"),
    pytest.param({"command": "x", "env": {"A": {"nested": 1}}}, "env", id="env-nested-value"),
    pytest.param({"command": "x", "min_free_mem_mb": -5}, "min_free_mem_mb", id="negative-mem"),
]


@pytest.mark.parametrize(("body", "needle"), BAD_BODIES)
def test_bad_input_is_a_400_that_creates_nothing(member, body, needle):
    HostFactory(name="gpu-a")
    runs, events = Run.objects.count(), RunEvent.objects.count()
    response = _create(member, **body)
    assert response.status_code == 400, response.content
    detail = response.json()["detail"]
    assert isinstance(detail, str) and needle in detail
    assert Run.objects.count() == runs and RunEvent.objects.count() == events


def test_unknown_sweep_detail_is_exact(member):
    response = _create(member, command="x", sweep_id="abc123")
    assert response.status_code == 400
    assert response.json() == {"detail": "Sweep not found: abc123"}
    assert not Run.objects.exists()


def test_field_errors_keep_per_field_lists(member):
    response = _create(member, command="x", gpus=-1)
    body = response.json()
    assert body["detail"].startswith("gpus: ")
    assert isinstance(body["errors"]["gpus"], list) and body["errors"]["gpus"]


def test_disabled_host_is_refused(member):
    HostFactory(name="gpu-off", enabled=False)
    response = _create(member, command="x", host="gpu-off")
    assert response.status_code == 400 and "disabled" in response.json()["detail"]
    assert not Run.objects.exists()


def test_non_json_body_is_a_400_with_detail(member):
    response = member.client.post(
        "/api/runs", data="{command: not json", content_type="application/json"
    )
    assert response.status_code == 400
    assert response["Content-Type"].startswith("application/json")
    assert "JSON" in response.json()["detail"]
    assert not Run.objects.exists() and not RunEvent.objects.exists()


def test_json_array_body_is_a_400(member):
    response = member.client.post("/api/runs", data="[1, 2]", content_type="application/json")
    assert response.status_code == 400 and response.json()["detail"]
    assert not Run.objects.exists()


def test_create_with_host_by_name(member):
    host = HostFactory(name="gpu-b")
    response = _create(member, command="x", host="gpu-b")
    assert response.status_code == 201
    assert Run.objects.get(pk=response.json()["id"]).host == host
    assert response.json()["host"] == "gpu-b"


# --- list --------------------------------------------------------------------------------


def test_list_is_newest_first_and_paginated(member):
    ids = [_create(member, command=f"python t.py --i={i}").json()["id"] for i in range(5)]
    newest_first = list(reversed(ids))

    page1 = member.client.get("/api/runs?limit=2").json()
    assert set(page1) == {"count", "next", "previous", "results"}
    assert page1["count"] == 5 and page1["previous"] is None
    assert [r["id"] for r in page1["results"]] == newest_first[:2]
    assert "offset=2" in page1["next"] and page1["next"].startswith("http://testserver/api/runs")

    page2 = member.client.get("/api/runs?limit=2&offset=2").json()
    assert [r["id"] for r in page2["results"]] == newest_first[2:4]

    last = member.client.get("/api/runs?limit=2&offset=4").json()
    assert [r["id"] for r in last["results"]] == newest_first[4:]
    assert last["next"] is None and last["previous"] is not None


def test_list_filters(member):
    host = HostFactory(name="gpu-c")
    plan = _plan(member)
    sweep = services.sweep_create_wild(actor=_actor(member), name="w")
    a = _actor(member)
    ready = services.run_create(actor=a, command="x", chat_session_id="s1")
    queued = services.run_create(actor=a, command="x", auto_start=True, sweep=sweep)
    held = services.run_create(actor=a, command="x", auto_start=True, plan=plan, host=host)

    def ids(query):
        response = member.client.get(f"/api/runs?{query}")
        assert response.status_code == 200, response.content
        return {r["id"] for r in response.json()["results"]}

    assert ids("status=queued") == {queued.id}
    assert ids("status=queued,held") == {queued.id, held.id}
    assert ids("status=ready") == {ready.id}
    assert ids(f"sweep_id={sweep.id}") == {queued.id}
    assert ids("chat_session_id=s1") == {ready.id}
    assert ids("host=gpu-c") == {held.id}
    assert ids("host=gpu-c&status=queued") == set()
    assert ids("") == {ready.id, queued.id, held.id}


@pytest.mark.parametrize("query", ["status=bogus", "status=queued,bogus"])
def test_unknown_status_filter_is_400(member, query):
    services.run_create(actor=_actor(member), command="x")
    response = member.client.get(f"/api/runs?{query}")
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "bogus" in detail and "queued" in detail  # names the bad value and the valid ones


def test_with_and_without_trailing_slash(member):
    created = member.client.post("/api/runs/", {"command": "x"}, format="json")
    assert created.status_code == 201
    run_id = created.json()["id"]
    assert Run.objects.filter(pk=run_id).exists()
    for path in ("/api/runs", "/api/runs/"):
        body = member.client.get(path).json()
        assert [r["id"] for r in body["results"]] == [run_id]
    for path in (f"/api/runs/{run_id}", f"/api/runs/{run_id}/"):
        response = member.client.get(path)
        assert response.status_code == 200 and response.json()["id"] == run_id
    assert member.client.post(f"/api/runs/{run_id}/start/").json()["status"] == "queued"
    assert member.client.post(f"/api/runs/{run_id}/stop").json()["status"] == "stopped"


def test_detail_404_is_json(member):
    response = member.client.get("/api/runs/x")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")
    assert response.json() == {"detail": "Run not found: x"}


def test_detail_shows_host_gpus_and_times(member):
    gpu = GpuFactory(host=HostFactory(name="gpu-d"), index=3)
    run = services.run_create(actor=_actor(member), command="x", auto_start=True, host=gpu.host)
    GpuLease.objects.create(gpu=gpu, run=run)
    body = member.client.get(f"/api/runs/{run.id}").json()
    assert body["host"] == "gpu-d"
    assert body["leased_gpus"] == [{"index": 3, "uuid": gpu.uuid}]
    assert body["queued_at"] is not None and body["exit_code"] is None
    assert body["created_by"] == "alice"


# --- start / stop / rerun ----------------------------------------------------------------


def test_start_queues_a_ready_run(member):
    run = services.run_create(actor=_actor(member), command="x")
    response = member.client.post(f"/api/runs/{run.id}/start")
    assert response.status_code == 200 and response.json()["status"] == "queued"
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED and run.queued_at is not None
    event = run.events.last()
    assert (event.from_status, event.to_status) == ("ready", "queued")
    assert event.actor_user == member.user and event.actor_kind == ActorKind.AGENT


def test_start_behind_unapproved_plan_holds(member):
    plan = _plan(member)
    run = services.run_create(actor=_actor(member), command="x", plan=plan)
    assert run.status == RunStatus.READY
    response = member.client.post(f"/api/runs/{run.id}/start")
    assert response.status_code == 200 and response.json()["status"] == "held"
    run.refresh_from_db()
    assert run.status == RunStatus.HELD and run.reason == RunReason.PLAN_NOT_APPROVED


def test_start_a_queued_run_is_409(member):
    run = services.run_create(actor=_actor(member), command="x", auto_start=True)
    events = run.events.count()
    response = member.client.post(f"/api/runs/{run.id}/start")
    assert response.status_code == 409
    assert "queued" in response.json()["detail"]
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED and run.events.count() == events


@pytest.mark.parametrize("start", ["ready", "held", "queued"])
def test_stop_a_waiting_run(member, start):
    a = _actor(member)
    if start == "ready":
        run = services.run_create(actor=a, command="x")
    elif start == "held":
        run = services.run_create(actor=a, command="x", plan=_plan(member), auto_start=True)
    else:
        run = services.run_create(actor=a, command="x", auto_start=True)
    assert run.status == start
    response = member.client.post(f"/api/runs/{run.id}/stop")
    assert response.status_code == 200 and response.json()["status"] == "stopped"
    run.refresh_from_db()
    assert run.status == RunStatus.STOPPED and run.ended_at is not None
    assert run.reason == RunReason.USER_STOP
    event = run.events.last()
    assert (event.from_status, event.to_status, event.reason) == (start, "stopped", "user_stop")
    assert event.actor_user == member.user and event.actor_token is not None


def test_stop_releases_active_leases(member):
    gpu = GpuFactory()
    run = services.run_create(actor=_actor(member), command="x", auto_start=True)
    lease = GpuLease.objects.create(gpu=gpu, run=run)
    member.client.post(f"/api/runs/{run.id}/stop")
    lease.refresh_from_db()
    assert lease.released_at is not None


def test_stop_a_stopped_run_is_409(member):
    run = services.run_create(actor=_actor(member), command="x")
    assert member.client.post(f"/api/runs/{run.id}/stop").status_code == 200
    events = run.events.count()
    response = member.client.post(f"/api/runs/{run.id}/stop")
    assert response.status_code == 409 and "stopped" in response.json()["detail"]
    assert run.events.count() == events


def test_rerun_creates_a_queued_child(member):
    run = services.run_create(
        actor=_actor(member),
        command="python train.py --lr=0.1",
        name="orig",
        env={"WANDB_MODE": "offline"},
        gpuwrap_config={"enabled": True},
        chat_session_id="s9",
    )
    services.run_stop(run=run, actor=_actor(member))
    response = member.client.post(f"/api/runs/{run.id}/rerun")
    assert response.status_code == 201
    body = response.json()
    assert body["id"] != run.id and body["parent_id"] == run.id and body["status"] == "queued"
    child = Run.objects.get(pk=body["id"])
    assert child.parent_id == run.id and child.status == RunStatus.QUEUED
    assert (child.command, child.name, child.env, child.gpus, child.chat_session_id) == (
        run.command,
        "orig",
        {"WANDB_MODE": "offline"},
        1,
        "s9",
    )
    assert child.events.get().reason == "rerun"
    run.refresh_from_db()
    assert run.status == RunStatus.STOPPED
    assert Run.objects.count() == 2


# --- secrets -----------------------------------------------------------------------------


def test_secret_looking_env_values_are_masked(member):
    env = {"API_KEY": "sk-live-123", "WANDB_TOKEN": "wb-456", "WANDB_MODE": "offline"}
    response = _create(member, command="x", env=env)
    assert response.status_code == 201
    run_id = response.json()["id"]
    assert Run.objects.get(pk=run_id).env == env  # kept for the run itself

    bodies = [
        response.content,
        member.client.get(f"/api/runs/{run_id}").content,
        member.client.get("/api/runs").content,
    ]
    for raw in bodies:
        assert b"sk-live-123" not in raw and b"wb-456" not in raw
    detail = json.loads(bodies[1])
    assert detail["env"]["API_KEY"] == detail["env"]["WANDB_TOKEN"] == "********"
    assert detail["env"]["WANDB_MODE"] == "offline"


# --- query count -------------------------------------------------------------------------


def _seed_runs(user, hosts, n, start):
    """n runs spread over hosts; every other run holds a live lease on its own GPU."""
    for i in range(start, start + n):
        host = hosts[i % len(hosts)]
        run = RunFactory(created_by=user, host=host, status=RunStatus.RUNNING)
        if i % 2 == 0:
            GpuLease.objects.create(gpu=GpuFactory(host=host), run=run)


def test_list_query_count_does_not_grow_with_runs(member, other):
    """GIVEN runs with hosts, leased GPUs and two owners WHEN listing 5 then 60 runs THEN the
    number of queries is the same (no N+1 on host, owner or leases)."""
    hosts = [HostFactory() for _ in range(3)]
    _seed_runs(member.user, hosts, 3, 0)
    _seed_runs(other.user, hosts, 2, 3)
    member.client.get("/api/runs?limit=50")  # the token's last_used_at write, once

    with CaptureQueriesContext(connection) as few:
        small = member.client.get("/api/runs?limit=50")
    assert small.json()["count"] == 5

    _seed_runs(member.user, hosts, 30, 5)
    _seed_runs(other.user, hosts, 25, 35)
    with CaptureQueriesContext(connection) as many:
        big = member.client.get("/api/runs?limit=50")
    body = big.json()
    assert body["count"] == 60 and len(body["results"]) == 50
    assert len(many.captured_queries) == len(few.captured_queries), [
        q["sql"] for q in many.captured_queries
    ]
    assert len(few.captured_queries) <= 6
    # the prefetched data is really there
    assert all(r["host"] for r in body["results"])
    leased = [r for r in body["results"] if r["leased_gpus"]]
    assert 20 <= len(leased) <= 30
    assert {r["created_by"] for r in body["results"]} == {"alice", "bob"}
