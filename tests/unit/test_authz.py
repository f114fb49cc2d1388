"""Every endpoint against anonymous, the owner (member), another member, a PI and an admin."""

from __future__ import annotations

import json

import pytest

from clusters.models import Host
from experiments import services
from experiments.actors import Actor
from experiments.choices import PlanStatus

ANON, OWNER, OTHER, PI, ADMIN = "anon", "member", "other", "pi", "admin"
WHO = [ANON, OWNER, OTHER, PI, ADMIN]


@pytest.fixture
def world(member, other, pi, admin, anon):
    """A ready run, a draft plan, a plan pending review and an open alert, all alice's."""
    actor = Actor(kind="user", user=member.user)
    run = services.run_create(actor=actor, command="python train.py", name="r")
    draft = services.plan_create(actor=actor, title="draft plan")
    pending = services.plan_submit(plan=services.plan_create(actor=actor, title="p"), actor=actor)
    alert = services.alert_raise(message="check this", run=run, choices=["acknowledge", "stop"])
    Host.objects.create(name="gpu-box", kind="ssh", hostname="10.200.0.9")
    clients = {
        ANON: anon,
        OWNER: member.client,
        OTHER: other.client,
        PI: pi.client,
        ADMIN: admin.client,
    }
    return {"run": run, "draft": draft, "pending": pending, "alert": alert, "clients": clients}


# (method, path template, body, {who: expected status}); missing who -> the default.
ALL_OK = {ANON: 401}
CASES = [
    ("get", "/api/runs", None, {ANON: 401}, 200),
    ("get", "/api/runs/{run}", None, {ANON: 401}, 200),
    ("post", "/api/runs", {"command": "echo hi"}, {ANON: 401}, 201),
    ("post", "/api/runs/{run}/start", None, {ANON: 401, OTHER: 403}, 200),
    ("post", "/api/runs/{run}/stop", None, {ANON: 401, OTHER: 403}, 200),
    ("post", "/api/runs/{run}/rerun", None, {ANON: 401, OTHER: 403}, 201),
    ("get", "/api/sweeps", None, {ANON: 401}, 200),
    (
        "post",
        "/api/sweeps",
        {"name": "g", "base_command": "x", "parameters": {"a": [1]}},
        {ANON: 401},
        201,
    ),
    ("post", "/api/sweeps/wild", {"name": "w"}, {ANON: 401}, 201),
    ("get", "/api/plans", None, {ANON: 401}, 200),
    ("get", "/api/plans/{draft}", None, {ANON: 401}, 200),
    ("post", "/api/plans", {"title": "t"}, {ANON: 401}, 201),
    ("patch", "/api/plans/{draft}", {"goal": "g"}, {ANON: 401, OTHER: 403}, 200),
    ("post", "/api/plans/{draft}/submit", {}, {ANON: 401, OTHER: 403}, 200),
    ("post", "/api/plans/{draft}/archive", {}, {ANON: 401, OTHER: 403}, 200),
    (
        "post",
        "/api/plans/{pending}/approve",
        {},
        {ANON: 401, OWNER: 403, OTHER: 403, ADMIN: 403},
        200,
    ),
    (
        "post",
        "/api/plans/{pending}/reject",
        {},
        {ANON: 401, OWNER: 403, OTHER: 403, ADMIN: 403},
        200,
    ),
    (
        "post",
        "/api/plans/{pending}/request-changes",
        {"comment": "more seeds"},
        {ANON: 401, OWNER: 403, OTHER: 403, ADMIN: 403},
        200,
    ),
    ("get", "/api/alerts", None, {ANON: 401}, 200),
    (
        "post",
        "/api/alerts/{alert}/respond",
        {"choice": "acknowledge"},
        {ANON: 401, OTHER: 403},
        200,
    ),
    ("get", "/api/cluster", None, {ANON: 401}, 200),
    ("post", "/api/cluster/detect", None, {ANON: 401}, 202),
    ("get", "/api/wild/v2/system-health", None, {}, 200),
    ("get", "/api/wild/v2/events/s1", None, {ANON: 401}, 200),
    ("get", "/api/health", None, {}, 200),
    ("get", "/api/prompt-skills", None, {}, 200),
    ("get", "/api/prompt-skills/plan_mode", None, {}, 200),
    ("get", "/api/prompt-skills/search?q=plan", None, {ANON: 401}, 200),
    ("post", "/api/prompt-skills/plan_mode/render", {}, {ANON: 401}, 200),
    (
        "patch",
        "/api/prompt-skills/plan_mode",
        {"description": "edited"},
        {ANON: 401, OWNER: 403, OTHER: 403},
        200,
    ),
    ("get", "/api/hosts", None, {ANON: 401}, 200),
    ("get", "/api/hosts/gpu-box", None, {ANON: 401}, 200),
    (
        "patch",
        "/api/hosts/gpu-box",
        {"env_setup": "source ~/venv/bin/activate"},
        {ANON: 401, OWNER: 403, OTHER: 403, PI: 403},
        200,
    ),
    ("delete", "/api/hosts/gpu-box", None, {ANON: 401, OWNER: 403, OTHER: 403, PI: 403}, 204),
    ("get", "/api/runs/{run}/logs", None, {ANON: 401}, 200),
    ("get", "/api/runs/{run}/metrics", None, {ANON: 401}, 200),
    ("get", "/api/openapi.json", None, {}, 200),
    ("get", "/api/docs", None, {}, 200),
]


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize(
    ("method", "template", "body", "expected", "default"),
    CASES,
    ids=[f"{c[0]} {c[1]}" for c in CASES],
)
def test_authz_matrix(world, who, method, template, body, expected, default):
    path = template.format(
        run=world["run"].id,
        draft=world["draft"].id,
        pending=world["pending"].id,
        alert=world["alert"].id,
    )
    client = world["clients"][who]
    response = (
        getattr(client, method)(path, body, format="json")
        if body is not None
        else (getattr(client, method)(path))
    )
    want = expected.get(who, default)
    assert response.status_code == want, (who, path, response.content[:300])
    if want >= 400:
        assert "detail" in response.json()


def test_forbidden_actions_change_nothing(world):
    """GIVEN bob (another member) WHEN he stops alice's run or approves a plan THEN nothing moves."""
    bob = world["clients"][OTHER]
    run, pending = world["run"], world["pending"]
    assert bob.post(f"/api/runs/{run.id}/stop").status_code == 403
    assert bob.post(f"/api/plans/{pending.id}/approve", {}, format="json").status_code == 403
    run.refresh_from_db()
    pending.refresh_from_db()
    assert run.status == "ready" and run.events.count() == 1
    assert pending.status == PlanStatus.PENDING_REVIEW


def test_nothing_but_the_preflight_is_open(anon, member):
    """Walk every operation of the live schema: anonymous gets 401 except the preflight list."""
    schema = json.loads(anon.get("/api/openapi.json").content)
    open_paths = {
        ("get", "/api/prompt-skills"),
        ("get", "/api/prompt-skills/{id}"),
        ("get", "/api/wild/v2/system-health"),
        ("get", "/api/health"),
    }
    checked = 0
    for path, ops in schema["paths"].items():
        for method in ops:
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            url = path.replace("{id}", "plan_mode" if "prompt-skills" in path else "x1")
            url = url.replace("{session_id}", "s1")
            response = getattr(anon, method)(url)
            checked += 1
            if (method, path) in open_paths:
                assert response.status_code == 200, (method, path)
            else:
                assert response.status_code == 401, (method, path, response.status_code)
    assert checked >= 25


def test_open_endpoints_leak_no_hosts_commands_or_users(anon, member):
    secret_command = "python train.py --api-key=sekrit-value"
    member.client.post("/api/runs", {"command": secret_command, "name": "leaky"}, format="json")
    body = anon.get("/api/wild/v2/system-health").content.decode()
    assert "sekrit" not in body and "alice" not in body and "leaky" not in body
    assert anon.get("/api/wild/v2/system-health").json()["total"] == 1


def test_a_hosts_env_setup_is_shown_to_admins_only(member, admin):
    """An admin's activation line may hold secrets: members see null (issue 9, item 6)."""
    from clusters.models import Host

    Host.objects.create(
        name="gpu-1", kind="ssh", hostname="10.0.0.9", env_setup="export HF_TOKEN=hf_secret"
    )
    for person, shown in ((member, None), (admin, "export HF_TOKEN=hf_secret")):
        listed = person.client.get("/api/hosts").json()
        rows = listed["results"] if isinstance(listed, dict) else listed
        assert [h["env_setup"] for h in rows if h["name"] == "gpu-1"] == [shown]
        assert person.client.get("/api/hosts/gpu-1").json()["env_setup"] == shown
    changed = admin.client.patch("/api/hosts/gpu-1", {"enabled": False}, format="json")
    assert changed.json()["env_setup"] == "export HF_TOKEN=hf_secret"
    assert "hf_secret" not in member.client.get("/api/cluster").content.decode()
