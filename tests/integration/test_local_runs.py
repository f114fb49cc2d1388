"""Runs really run on the `local` host: a real worker (with beat), real processes."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.utils import timezone

from clusters.services import host_ensure_local
from experiments import jobs, runner, scheduler, services
from experiments.actors import Actor
from experiments.models import Run
from tests.harness.localruns import run_user_dir
from tests.harness.worker import wait_for

TERMINAL = {"finished", "failed", "stopped"}


@pytest.fixture
def local(celery_worker):
    return host_ensure_local()


def create(client, **body):
    response = client.post("/api/runs", {"auto_start": True, **body}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def ended(run_id: str, timeout: float = 60) -> Run:
    return wait_for(
        lambda: (r := Run.objects.get(pk=run_id)).status in TERMINAL and r, timeout=timeout
    )


def gone_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except FileNotFoundError:
        return True


def logs(client, run_id: str, **params) -> dict:
    return client.get(f"/api/runs/{run_id}/logs", params).json()


def test_exit_codes_become_finished_failed_and_killed(local, member):
    ok = create(member.client, name="ok", command="echo fine")
    bad = create(member.client, name="bad", command="echo oops >&2; exit 3")
    killed = create(member.client, name="killed", command="kill -9 $$")
    assert (r := ended(ok)).status == "finished" and r.exit_code == 0 and r.host.name == "local"
    assert (r := ended(bad)).status == "failed" and r.reason == "exit_code" and r.exit_code == 3
    assert (r := ended(killed)).status == "failed" and r.exit_code == 137
    assert "oops" in logs(member.client, bad)["content"]
    events = [e.to_status for e in Run.objects.get(pk=ok).events.order_by("id")]
    assert events == ["queued", "launching", "running", "finished"]


def test_output_interleaved_unicode_bytes_and_progress_bars(local, member):
    command = (
        "echo out1; echo err1 >&2; echo out2; printf 'caf\\xc3\\xa9 \\xff\\xfe end\\n'; "
        "printf 'step 1/3\\rstep 2/3\\rstep 3/3\\n'; echo 日本語"
    )
    run_id = create(member.client, name="bytes", command=command)
    assert ended(run_id).status == "finished"
    body = logs(member.client, run_id)
    lines = body["content"].splitlines()
    assert lines[:3] == ["out1", "err1", "out2"]
    assert lines[3].startswith("café ") and lines[3].endswith(" end")
    assert "step 3/3" in lines and not any("step 1/3" in line for line in lines)
    assert "日本語" in lines
    tail = logs(member.client, run_id, offset=-10)
    assert tail["has_more_before"] and not tail["has_more_after"]
    assert tail["offset"] == body["total_size"] - 10
    raw = (Path(os.environ["LABSITE_DATA_DIR"]) / "logs" / f"{run_id}.log").read_bytes()
    assert b"\xff\xfe" in raw and b"step 1/3\r" in raw, "the raw log is kept as bytes"


@pytest.fixture
def scratch():
    """A directory this host's runs may write (they run as the run user where there is one)."""
    with run_user_dir() as path:
        yield path


def test_shell_metacharacters_are_data_not_code(local, member, scratch):
    canary = Path(f"/tmp/lab-canary-{os.getpid()}")
    evil = f"$(touch {canary}); `touch {canary}`; touch {canary}"
    run_id = create(
        member.client,
        name=evil,
        command="printf '%s|%s\\n' \"$EVIL\" 'it'\"'\"'s $HOME'",
        env={"EVIL": evil, "QUOTES": "a'b\"c\\d"},
        workdir=str(scratch),
    )
    assert ended(run_id).status == "finished"
    assert logs(member.client, run_id)["content"].strip() == f"{evil}|it's $HOME"
    assert not canary.exists()
    assert Run.objects.get(pk=run_id).name == evil


def test_a_50_mb_log_is_copied_whole(local, member):
    command = "head -c 50000000 /dev/zero | tr '\\0' x | fold -w 100; echo; echo END"
    run_id = create(member.client, name="big", command=command)
    assert ended(run_id, timeout=180).status == "finished"
    body = logs(member.client, run_id, offset=0, limit=16)
    assert body["total_size"] == 50_000_000 + 499_999 + 1 + 4  # fold's newlines, echo, END
    assert body["has_more_after"] and body["content"] == "x" * 16
    assert logs(member.client, run_id, offset=-4)["content"] == "END\n"


def test_metrics_lines_become_series(local, member):
    script = (
        "python3 -c \"import sys; sys.path.insert(0, '" + str(Path(__file__).parents[2]) + "'); "
        "from labsite_client import log_metrics\n"
        "for i in range(5): log_metrics(step=i, loss=1.0/(i+1))\n"
        "log_metrics(**{'final/acc': 0.9})\""
    )
    run_id = create(member.client, name="metrics", command=script)
    assert ended(run_id).status == "finished"
    metrics = member.client.get(f"/api/runs/{run_id}/metrics").json()
    assert [p["step"] for p in metrics["series"]["loss"]] == [0, 1, 2, 3, 4]
    assert metrics["latest"] == {"loss": 0.2, "final/acc": 0.9}


def test_stop_kills_children_that_ignore_sigterm(local, member):
    command = (
        "trap '' TERM; (trap '' TERM; sleep 600) & (setsid sh -c 'trap \"\" TERM; sleep 600') & "
        "echo started; sleep 600"
    )
    run_id = create(member.client, name="stubborn", command=command)
    wait_for(
        lambda: (
            Run.objects.get(pk=run_id).status == "running"
            and "started" in logs(member.client, run_id)["content"]
        ),
        timeout=60,
    )
    run = Run.objects.get(pk=run_id)
    assert member.client.post(f"/api/runs/{run_id}/stop").status_code == 200
    assert ended(run_id).status == "stopped"
    marker = f"LABSITE_RUN_ID={run_id}".encode()
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in env:
                left.append(proc.name)
    assert left == [], f"processes of the run survived the stop: {left}"
    assert run.pid and gone_or_zombie(run.pid), "the wrapper outlived the stop"


def test_a_stopped_run_is_stopped_only_once_nothing_of_it_is_left(local, member):
    """GIVEN a run whose main process dies on SIGTERM but whose child ignores it WHEN it is
    stopped THEN it shows `stopped` (and its leases go) only after the grace period's SIGKILL
    took the child: until then it is running with stop_requested. (On a7cc089 the next poll saw
    the wrapper's exit code and showed `stopped` while the child lived on for the grace.)"""
    run_id = create(
        member.client, name="half", command="(trap '' TERM; sleep 600) & echo started; wait"
    )
    wait_for(
        lambda: (
            Run.objects.get(pk=run_id).status == "running"
            and "started" in logs(member.client, run_id)["content"]
        ),
        timeout=60,
    )
    marker = f"LABSITE_RUN_ID={run_id}".encode()

    def left() -> list[str]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(proc.name)
            except OSError:
                continue
        return found

    assert left(), "the run's processes are not visible"
    assert member.client.post(f"/api/runs/{run_id}/stop").status_code == 200
    seen_running_with_stop = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        run = Run.objects.get(pk=run_id)
        alive = left()
        if run.status in TERMINAL:
            assert alive == [], f"{run.status} while processes of it live: {alive}"
            break
        seen_running_with_stop |= run.stop_requested_at is not None and not alive == []
        time.sleep(0.05)
    assert Run.objects.get(pk=run_id).status == "stopped"
    assert seen_running_with_stop


def test_stop_of_a_queued_run_never_starts_it(local, member):
    run_id = create(
        member.client, name="q", command="echo should-not-run", host="local", gpus=1
    )  # the local host has no GPU: it stays queued
    wait_for(lambda: Run.objects.get(pk=run_id).waiting_reason, timeout=30)
    assert "needs 1 GPU" in Run.objects.get(pk=run_id).waiting_reason
    assert member.client.post(f"/api/runs/{run_id}/stop").json()["status"] == "stopped"
    time.sleep(2)
    assert Run.objects.get(pk=run_id).status == "stopped"


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, tuple[Any, ...]]]:
    """The tasks the code under test sends (name, args), recorded instead of queued."""
    tasks: list[tuple[str, tuple[Any, ...]]] = []
    monkeypatch.setattr(jobs, "_send", lambda name, *args, **kw: tasks.append((name, args)))
    return tasks


@pytest.fixture
def placed(member, scratch, sent):
    """`placed.run(command)`: a CPU run on `placed.host` (local), placed (launching) and not
    dispatched yet; no worker runs, so each test says when a dispatch or a poll arrives."""
    host = host_ensure_local()
    host.enabled, host.run_root = True, str(scratch / "runs")
    host.save(update_fields=["enabled", "run_root"])
    actor = Actor(kind="user", user=member.user)

    def make(command: str) -> Run:
        run = services.run_create(
            actor=actor, command=command, host=host, gpus=0, auto_start=True, kick=False
        )
        scheduler.schedule_pass()
        assert Run.objects.get(pk=run.pk).status == "launching"
        assert ("experiments.tasks.dispatch_run", (run.pk,)) in sent  # the placement's own
        sent.clear()  # what the tests look at are the sends that come after it
        return run

    return SimpleNamespace(host=host, actor=actor, run=make)


@pytest.mark.django_db(transaction=True)  # the runner sends its tasks as commits happen
def test_a_run_stopped_while_launching_never_starts(placed, sent, scratch):
    """GIVEN a launching run whose dispatch has not reached the host (a host cut off, a broker
    hiccup) WHEN it is stopped and then a late dispatch and a poll arrive before the cancel
    THEN neither starts its command: the poll sends the cancel, which records `stopped`.
    (The ssh tier saw this race: a tick poll re-sent the dispatch before the cancel ran.)"""
    late = scratch / "late-executed"
    run = placed.run(f"touch {late}")
    services.run_stop(run=Run.objects.get(pk=run.pk), actor=placed.actor)

    runner.run_dispatch(run.id)  # sent before the stop, delivered after it
    runner.host_sync(placed.host.id)  # finds the run missing on the host
    assert ("experiments.tasks.cancel_run", (run.id,)) in sent
    assert ("experiments.tasks.dispatch_run", (run.id,)) not in sent
    runner.run_cancel(run.id)
    runner.run_dispatch(run.id)
    time.sleep(1)
    assert not late.exists(), "the stopped run's command ran"
    done = Run.objects.get(pk=run.pk)
    assert (done.status, done.reason, done.pid) == ("stopped", "user_stop", None)


@pytest.mark.django_db(transaction=True)
def test_a_dispatch_on_its_way_is_not_sent_twice_and_a_lost_one_is(placed, sent):
    """GIVEN a run just placed, its dispatch not yet on the host WHEN a poll finds it missing
    THEN the dispatch is not sent again (it is on its way); WHEN it is still missing after
    runner.DISPATCH_RESEND_AFTER THEN it was lost, and the poll sends it again."""
    run, host = placed.run("true"), placed.host
    runner.host_sync(host.id)
    assert ("experiments.tasks.dispatch_run", (run.id,)) not in sent
    assert Run.objects.get(pk=run.pk).status == "launching"  # waiting, not lost
    late = timezone.now() - runner.DISPATCH_RESEND_AFTER - timedelta(seconds=1)
    Run.objects.filter(pk=run.pk).update(launched_at=late)
    runner.host_sync(host.id)
    assert sent.count(("experiments.tasks.dispatch_run", (run.id,))) == 1
    runner.run_dispatch(run.id)  # the resent dispatch arrives: the run starts, once
    done = wait_for(
        lambda: (
            runner.host_sync(host.id) and (r := Run.objects.get(pk=run.pk)).status in TERMINAL and r
        ),
        timeout=30,
    )
    assert (done.status, done.exit_code, done.dispatch_attempts) == ("finished", 0, 1)
