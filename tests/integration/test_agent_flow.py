"""An agent following AGENT_API.md with `curl -sf`, step by step, against a live server."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from django.core.management import call_command

from experiments.models import Run


def curl(url: str, *args: str, token: str | None = None, body: Any = None) -> Any:
    cmd = ["curl", "-sf", "--max-time", "30"]
    if token:
        cmd += ["-H", f"X-Auth-Token: {token}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    cmd += [*args, url]
    out = subprocess.run(cmd, capture_output=True, timeout=60)
    assert out.returncode == 0, f"curl -sf {' '.join(args)} {url} failed ({out.returncode})"
    text = out.stdout.decode()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@pytest.mark.django_db(transaction=True)
def test_an_agent_session_through_curl(live_server):
    api = f"{live_server.url}/api"
    # Preflight: no token, every request must succeed or the agent aborts.
    assert "swagger" in curl(f"{api}/docs").lower()
    assert "/api/runs" in curl(f"{api}/openapi.json")["paths"]
    skills = curl(f"{api}/prompt-skills")
    assert {"id", "name", "description", "category", "variables"} <= set(skills[0])
    ops = curl(f"{api}/prompt-skills/wild_v2_execution_ops_protocol")
    assert "/runs" in ops["template"]
    health = curl(f"{api}/wild/v2/system-health")
    assert {
        "running",
        "queued",
        "completed",
        "failed",
        "total",
        "gpu_total",
        "gpu_free",
        "max_new_runs",
    } <= set(health)

    agent = _token("agent-alice", "member")
    pi = _token("prof", "pi")
    session = "chat-42"

    cluster = curl(f"{api}/cluster/detect", "-X", "POST", token=agent)
    assert cluster["type"] in {"local_gpu", "slurm", "cpu_only"}
    assert "gpu_count" in cluster and any(h["name"] == "local" for h in cluster["hosts"])
    assert curl(f"{api}/cluster", token=agent)["runs"]["queued"] == 0

    plan = curl(
        f"{api}/plans",
        token=agent,
        body={
            "title": "LR sweep",
            "goal": "find a good lr",
            "session_id": None,
            "raw_markdown": "## Objective\nBeat baseline\n## Parameters to Sweep\nlr\n",
        },
    )
    assert plan["status"] == "draft" and plan["sections"]["Objective"] == "Beat baseline"
    print(f"@{plan['id']}")
    assert (
        curl(f"{api}/plans/{plan['id']}/submit", token=agent, body={})["status"] == "pending_review"
    )

    wild = curl(
        f"{api}/sweeps/wild",
        token=agent,
        body={
            "name": "wild-1",
            "goal": "explore",
            "chat_session_id": session,
            "plan_id": plan["id"],
        },
    )
    run = curl(
        f"{api}/runs",
        token=agent,
        body={
            "name": "baseline",
            "command": "python train.py --lr 0.1",
            "sweep_id": wild["id"],
            "chat_session_id": session,
            "auto_start": True,
            "gpuwrap_config": {"enabled": True, "retries": -1, "retry_delay_seconds": 30},
        },
    )
    assert run["status"] == "held" and run["gpus"] == 1

    grid = curl(
        f"{api}/sweeps",
        token=agent,
        body={
            "name": "grid",
            "base_command": "python train.py",
            "parameters": {"lr": [0.1, 0.01]},
            "max_runs": 2,
            "goal": "lr",
            "auto_start": True,
            "chat_session_id": session,
        },
    )
    assert len(grid["runs"]) == 2 and {r["status"] for r in grid["runs"]} == {"queued"}

    listed = curl(f"{api}/runs?chat_session_id={session}&limit=10", token=agent)
    assert (
        listed["count"] == 3
        and listed["results"][0]["created_at"] >= listed["results"][-1]["created_at"]
    )
    assert curl(f"{api}/runs/{run['id']}", token=agent)["id"] == run["id"]

    # The PI approves: the held run is released to the queue.
    approved = curl(
        f"{api}/plans/{plan['id']}/approve",
        token=pi,
        body={"comment": "go", "gpu_hours_budget": 100},
    )
    assert approved["status"] == "approved" and approved["gpu_hours_budget"] == 100
    assert curl(f"{api}/runs/{run['id']}", token=agent)["status"] == "queued"
    assert curl(f"{api}/plans", token=agent)["results"][0]["id"] == plan["id"]
    assert curl(f"{api}/plans/{plan['id']}", token=agent)["reviewer"] == "prof"

    logs = curl(f"{api}/runs/{run['id']}/logs?offset=-4000&limit=4000", token=agent)
    assert {"content", "offset", "total_size", "has_more_before", "has_more_after"} <= set(logs)
    metrics = curl(f"{api}/runs/{run['id']}/metrics", token=agent)
    assert metrics["series"] == {} and metrics["latest"] == {}
    assert curl(f"{api}/hosts", token=agent)["count"] >= 1
    stopped = curl(f"{api}/runs/{run['id']}/stop", "-X", "POST", token=agent)
    assert stopped["status"] == "stopped"
    rerun = curl(f"{api}/runs/{run['id']}/rerun", "-X", "POST", token=agent)
    assert rerun["parent_id"] == run["id"] and rerun["status"] == "queued"
    ready = curl(f"{api}/runs", token=agent, body={"command": "echo later", "name": "later"})
    assert curl(f"{api}/runs/{ready['id']}/start", "-X", "POST", token=agent)["status"] == "queued"

    assert curl(f"{api}/alerts", token=agent)["count"] == 0
    events = curl(f"{api}/wild/v2/events/{session}", token=agent)
    assert events["session_id"] == session and isinstance(events["events"], list)
    found = curl(f"{api}/prompt-skills/search?q=plan", token=agent)
    assert found and found[0]["id"] in {"plan_mode", "plan_runs"}
    rendered = curl(
        f"{api}/prompt-skills/wild_v2_execution_ops_protocol/render",
        token=agent,
        body={"variables": {}},
    )
    assert api in rendered["rendered"] and agent in rendered["rendered"]
    assert "POST /api/runs" in rendered["rendered"]
    assert Run.objects.count() == 5


def test_errors_are_json_with_detail_and_never_html(live_server, db):
    agent = _token("agent-bob", "member")
    api = f"{live_server.url}/api"
    for method, path, body in [
        ("POST", "/runs", {"command": "x", "sweep_id": "abc"}),
        ("POST", "/runs", {"command": ""}),
        ("GET", "/runs/nope", None),
        ("GET", "/no/such/endpoint", None),
        ("POST", "/runs", "{not json"),
    ]:
        cmd = [
            "curl",
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
            "-H",
            f"X-Auth-Token: {agent}",
            "-H",
            "Content-Type: application/json",
        ]
        if body is not None:
            cmd += ["-d", body if isinstance(body, str) else json.dumps(body)]
        out = subprocess.run([*cmd, f"{api}{path}"], capture_output=True, text=True, timeout=30)
        text, code = out.stdout.rsplit("\n", 1)
        assert 400 <= int(code) < 500, (path, code)
        assert json.loads(text)["detail"], (path, text)
    missing = subprocess.run(
        [
            "curl",
            "-s",
            "-X",
            "POST",
            "-H",
            f"X-Auth-Token: {agent}",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"command": "x", "sweep_id": "abc"}',
            f"{api}/runs",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(missing.stdout)["detail"] == "Sweep not found: abc"


def _token(username: str, role: str) -> str:
    from io import StringIO

    buf = StringIO()
    call_command("create_token", username, "--role", role, stdout=buf)
    return buf.getvalue().strip()
