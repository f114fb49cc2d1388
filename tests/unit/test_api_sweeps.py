"""POST /api/sweeps (grid) and /api/sweeps/wild, and the status a sweep derives from its runs."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from experiments import services
from experiments.actors import Actor
from experiments.choices import ActorKind, PlanStatus, RunReason, RunStatus
from experiments.models import Run, RunEvent, Sweep


def _actor(person) -> Actor:
    return Actor(kind=ActorKind.USER, user=person.user)


def _grid(person, **body):
    body.setdefault("name", "grid")
    body.setdefault("base_command", "python train.py")
    return person.client.post("/api/sweeps", body, format="json")


NASTY = ["a b", "it's", '"dq"', "$(echo INJECTED)", "x; echo INJECTED", "`id`", "*", ""]


def test_grid_makes_one_run_per_point_with_its_params(member):
    response = _grid(
        member,
        base_command="python train.py --epochs=10",
        parameters={"lr": [0.1, 0.01], "batch_size": [64, 128], "amp": [True]},
        max_runs=4,
    )
    assert response.status_code == 201, response.content
    body = response.json()
    sweep = Sweep.objects.get(pk=body["id"])
    assert sweep.kind == "grid" and sweep.created_by == member.user
    assert sweep.parameters == {"lr": [0.1, 0.01], "batch_size": [64, 128], "amp": [True]}
    runs = list(sweep.runs.all())
    assert len(runs) == len(body["runs"]) == 4
    got = {tuple(shlex.split(r.command)) for r in runs}
    assert got == {
        ("python", "train.py", "--epochs=10", f"--lr={lr}", f"--batch_size={bs}", "--amp=true")
        for lr in ("0.1", "0.01")
        for bs in ("64", "128")
    }
    assert sorted((r.params["lr"], r.params["batch_size"]) for r in runs) == [
        (0.01, 64),
        (0.01, 128),
        (0.1, 64),
        (0.1, 128),
    ]
    assert all(r.params["amp"] is True for r in runs)
    assert all(r.status == RunStatus.READY and r.created_by == member.user for r in runs)
    assert {r["id"] for r in body["runs"]} == {r.id for r in runs}


def test_grid_values_are_shell_quoted(member):
    """GIVEN parameter values with spaces, quotes, $(...), ; and backticks WHEN the grid expands
    THEN each command splits back into exactly base argv + --key=value (nothing would run)."""
    response = _grid(member, parameters={"tag": NASTY, "seed": [0]})
    assert response.status_code == 201, response.content
    runs = Run.objects.filter(sweep_id=response.json()["id"])
    assert runs.count() == len(NASTY)
    for run in runs:
        value = run.params["tag"]
        assert shlex.split(run.command) == ["python", "train.py", f"--tag={value}", "--seed=0"]
    assert {r.params["tag"] for r in runs} == set(NASTY)


def test_grid_commands_run_by_a_shell_print_values_literally(member):
    """The real check: a POSIX shell receives each value as one literal argument."""
    response = _grid(member, base_command="printf '[%s]\\n'", parameters={"v": NASTY})
    assert response.status_code == 201
    for run in Run.objects.filter(sweep_id=response.json()["id"]):
        out = subprocess.run(
            ["/bin/sh", "-c", run.command], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        assert out == f"[--v={run.params['v']}]\n"


def test_grid_larger_than_max_runs_is_refused_and_creates_nothing(member):
    response = _grid(member, parameters={"a": [1, 2, 3], "b": [1, 2]}, max_runs=5)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "6 points" in detail and "max_runs=5" in detail
    assert not Sweep.objects.exists()
    assert not Run.objects.exists() and not RunEvent.objects.exists()


def test_grid_equal_to_max_runs_is_fine(member):
    response = _grid(member, parameters={"a": [1, 2, 3], "b": [1, 2]}, max_runs=6)
    assert response.status_code == 201
    assert Run.objects.filter(sweep_id=response.json()["id"]).count() == 6


def test_grid_auto_start_queues_every_run(member):
    response = _grid(member, parameters={"a": [1, 2]}, auto_start=True, chat_session_id="s1")
    assert response.status_code == 201
    runs = Run.objects.filter(sweep_id=response.json()["id"])
    assert {r.status for r in runs} == {RunStatus.QUEUED}
    assert {r.chat_session_id for r in runs} == {"s1"}
    assert response.json()["status"] == "queued"


def test_grid_with_unapproved_plan_is_held(member):
    plan = services.plan_submit(
        plan=services.plan_create(actor=_actor(member), title="p"), actor=_actor(member)
    )
    response = _grid(member, parameters={"a": [1, 2, 3]}, auto_start=True, plan_id=plan.id)
    assert response.status_code == 201
    assert response.json()["plan_id"] == plan.id
    runs = Run.objects.filter(sweep_id=response.json()["id"])
    assert runs.count() == 3
    assert {(r.status, r.reason) for r in runs} == {(RunStatus.HELD, RunReason.PLAN_NOT_APPROVED)}
    assert response.json()["status"] == "held"


def test_grid_run_options_reach_every_run(member):
    response = _grid(
        member,
        parameters={"a": [1, 2]},
        gpuwrap_config={"enabled": True},
        env={"WANDB_MODE": "offline"},
        workdir="~/p",
        priority=5,
    )
    assert response.status_code == 201, response.content
    for run in Run.objects.filter(sweep_id=response.json()["id"]):
        assert (run.gpus, run.env, run.workdir, run.priority) == (
            1,
            {"WANDB_MODE": "offline"},
            "~/p",
            5,
        )


@pytest.mark.parametrize(
    "parameters",
    [
        pytest.param([1, 2], id="list-not-dict"),
        pytest.param("lr=0.1", id="string"),
        pytest.param({}, id="empty-dict"),
        pytest.param({"lr": []}, id="empty-list"),
        pytest.param({"lr": 0.1}, id="value-not-list"),
        pytest.param({"lr": {"min": 0, "max": 1}}, id="value-is-object"),
        pytest.param({"lr": [{"v": 0.1}]}, id="nested-object-value"),
        pytest.param({"lr": [[0.1, 0.2]]}, id="nested-list-value"),
        pytest.param({"lr": [None]}, id="null-value"),
        pytest.param({"l r; x": [1]}, id="bad-name"),
    ],
)
def test_invalid_parameters_are_400(member, parameters):
    response = _grid(member, parameters=parameters)
    assert response.status_code == 400, response.content
    assert response.json()["detail"].startswith("parameters")
    assert not Sweep.objects.exists() and not Run.objects.exists()


def test_unknown_plan_on_grid_is_400(member):
    response = _grid(member, parameters={"a": [1]}, plan_id="nope")
    assert response.status_code == 400 and response.json()["detail"] == "Plan not found: nope"
    assert not Sweep.objects.exists() and not Run.objects.exists()


# --- wild sweeps ---------------------------------------------------------------------------


def test_wild_sweep_creation(member):
    response = member.client.post(
        "/api/sweeps/wild",
        {"name": "agent loop", "goal": "beat baseline", "chat_session_id": "sess-1"},
        format="json",
    )
    assert response.status_code == 201
    body = response.json()
    sweep = Sweep.objects.get(pk=body["id"])
    assert body["kind"] == sweep.kind == "wild"
    assert body["chat_session_id"] == sweep.chat_session_id == "sess-1"
    assert sweep.goal == "beat baseline" and sweep.base_command == "" and sweep.parameters == {}
    assert body["runs"] == [] and body["status"] == "empty"
    assert not Run.objects.exists()


def test_wild_sweep_without_name_is_400(member):
    response = member.client.post("/api/sweeps/wild", {"goal": "g"}, format="json")
    assert response.status_code == 400 and response.json()["detail"].startswith("name")
    assert not Sweep.objects.exists()


def test_runs_added_to_wild_sweep(member):
    """GIVEN a wild sweep for session sess-1 WHEN runs are added with sweep_id THEN each keeps
    its own command and params, takes the sweep's session unless it names one, and shows up
    in the sweep."""
    sweep = services.sweep_create_wild(actor=_actor(member), name="loop", chat_session_id="sess-1")
    first = member.client.post(
        "/api/runs",
        {
            "command": "python train.py --lr=0.05",
            "sweep_id": sweep.id,
            "auto_start": True,
        },
        format="json",
    ).json()
    second = member.client.post(
        "/api/runs",
        {
            "command": "python eval.py",
            "sweep_id": sweep.id,
            "chat_session_id": "sess-2",
        },
        format="json",
    ).json()

    r1, r2 = Run.objects.get(pk=first["id"]), Run.objects.get(pk=second["id"])
    assert (r1.command, r1.params, r1.sweep_id, r1.chat_session_id, r1.status) == (
        "python train.py --lr=0.05",
        {},
        sweep.id,
        "sess-1",
        RunStatus.QUEUED,
    )
    assert (r2.command, r2.chat_session_id, r2.status) == (
        "python eval.py",
        "sess-2",
        RunStatus.READY,
    )
    assert r1.plan_id is None and r1.gpus == 0

    detail = member.client.get(f"/api/sweeps/{sweep.id}").json()
    assert [r["id"] for r in detail["runs"]] == [r1.id, r2.id]
    assert detail["kind"] == "wild" and detail["base_command"] == ""
    assert detail["progress"]["total"] == 2


def test_wild_sweep_with_rejected_plan_is_400(member, pi):
    plan = services.plan_create(actor=_actor(member), title="p")
    services.plan_reject(plan=plan, actor=_actor(pi))
    response = member.client.post(
        "/api/sweeps/wild", {"name": "w", "plan_id": plan.id}, format="json"
    )
    assert response.status_code == 400 and "rejected" in response.json()["detail"]
    assert not Sweep.objects.exists()


# --- derived status ------------------------------------------------------------------------


def _move(run, *path, **fields):
    for to in path:
        assert services.run_transition(run_id=run.id, to=to, actor=Actor.system(), fields=fields)


def test_sweep_status_and_progress_follow_its_runs(member):
    response = _grid(member, parameters={"a": [1, 2, 3]}, auto_start=True)
    sweep_id = response.json()["id"]
    r1, r2, r3 = Run.objects.filter(sweep_id=sweep_id).order_by("created_at", "id")

    def state():
        detail = member.client.get(f"/api/sweeps/{sweep_id}").json()
        listed = {s["id"]: s for s in member.client.get("/api/sweeps").json()["results"]}
        assert listed[sweep_id]["status"] == detail["status"]
        assert listed[sweep_id]["progress"] == detail["progress"]
        return detail["status"], detail["progress"]

    status, progress = state()
    assert status == "queued"
    assert progress["total"] == 3 and progress["done"] == 0
    assert progress["by_status"]["queued"] == 3

    _move(r1, RunStatus.LAUNCHING, RunStatus.RUNNING)
    status, progress = state()
    assert status == "running"
    assert (progress["by_status"]["running"], progress["by_status"]["queued"]) == (1, 2)

    _move(r1, RunStatus.FINISHED)
    services.run_stop(run=r2, actor=_actor(member))
    status, progress = state()
    assert status == "queued" and progress["done"] == 2

    _move(r3, RunStatus.FAILED)
    status, progress = state()
    assert status == "failed"
    assert progress == {
        "total": 3,
        "done": 3,
        "by_status": {**{s: 0 for s in RunStatus.values}, "finished": 1, "stopped": 1, "failed": 1},
    }


def test_sweep_of_finished_runs_is_finished(member):
    response = _grid(member, parameters={"a": [1, 2]}, auto_start=True)
    for run in Run.objects.filter(sweep_id=response.json()["id"]):
        _move(run, RunStatus.LAUNCHING, RunStatus.RUNNING, RunStatus.FINISHED)
    detail = member.client.get(f"/api/sweeps/{response.json()['id']}").json()
    assert detail["status"] == "finished" and detail["progress"]["done"] == 2


def test_held_grid_becomes_queued_when_its_plan_is_approved(member, pi):
    """A held grid becomes queued once its plan is approved (status read from the runs)."""
    plan = services.plan_submit(
        plan=services.plan_create(actor=_actor(member), title="p"), actor=_actor(member)
    )
    created = _grid(member, parameters={"a": [1, 2]}, auto_start=True, plan_id=plan.id)
    sweep_id = created.json()["id"]
    assert member.client.get(f"/api/sweeps/{sweep_id}").json()["status"] == "held"
    services.plan_approve(plan=plan, actor=_actor(pi))
    assert plan.status == PlanStatus.APPROVED
    assert member.client.get(f"/api/sweeps/{sweep_id}").json()["status"] == "queued"
