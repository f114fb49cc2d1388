"""Writes whose query count must not grow with the work (issue 10, bug 3): pinned here.

Each test does the same thing for 10 and for 100 runs and compares the queries: a write that
loops over its rows shows up as a difference of 90 (or 180, ...).

On SQLite, Django splits a bulk statement at 999 variables (the library's compile-time default
of long ago); the tests tell it the connection's real limit, so that a split statement does not
pass for a loop and every count compares one statement with one statement on both backends.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from clusters.services import host_ensure_local, local_machine
from experiments import runner, services
from experiments.actors import Actor
from experiments.models import Metric, Plan, Run, RunEvent, Sweep
from labsite import roles
from tests.factories import RunFactory
from tests.harness.localruns import run_user_dir


@pytest.fixture(autouse=True)
def _sqlite_real_variable_limit(db, monkeypatch):
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        limit = connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        monkeypatch.setattr(connection.features, "max_query_params", limit)


def queries(call: Callable[[], object]) -> int:
    with CaptureQueriesContext(connection) as ctx:
        call()
    return len(ctx.captured_queries)


def held_plan(member, n: int) -> tuple[Plan, Sweep]:
    """A plan under review with a grid of n runs held behind it."""
    actor = Actor(kind="user", user=member.user)
    plan = services.plan_submit(plan=services.plan_create(actor=actor, title=f"p{n}"), actor=actor)
    sweep = services.sweep_create_grid(
        actor=actor,
        name=f"grid-{n}",
        base_command="python train.py",
        parameters={"lr": list(range(n))},
        auto_start=True,
        plan=plan,
    )
    assert Run.objects.filter(sweep=sweep, status="held").count() == n
    return plan, sweep


def test_approving_a_plan_costs_the_same_for_10_and_100_held_runs(member, pi):
    """GIVEN plans with 10 and with 100 held runs WHEN a PI approves each THEN both cost the
    same queries, and every run is queued with exactly one plan_approved event."""
    reviewer = Actor(kind="user", user=pi.user)
    roles.is_pi(pi.user)  # the PI's roles, read once and cached on the user: not the approval's
    counts = {}
    for n in (10, 100):
        plan, sweep = held_plan(member, n)
        counts[n] = queries(lambda plan=plan: services.plan_approve(plan=plan, actor=reviewer))
        assert set(Run.objects.filter(sweep=sweep).values_list("status", flat=True)) == {"queued"}
        events = RunEvent.objects.filter(run__sweep=sweep, reason="plan_approved")
        assert events.count() == n
        assert set(events.values_list("from_status", "to_status")) == {("held", "queued")}
    assert counts[10] == counts[100], counts


def test_rejecting_a_plan_costs_the_same_for_10_and_100_held_runs(member, pi):
    reviewer = Actor(kind="user", user=pi.user)
    roles.is_pi(pi.user)
    counts = {}
    for n in (10, 100):
        plan, sweep = held_plan(member, n)
        counts[n] = queries(lambda plan=plan: services.plan_reject(plan=plan, actor=reviewer))
        assert set(Run.objects.filter(sweep=sweep).values_list("status", "reason")) == {
            ("stopped", "plan_rejected")
        }
        assert RunEvent.objects.filter(run__sweep=sweep, to_status="stopped").count() == n
    assert counts[10] == counts[100], counts


def test_a_bulk_transition_moves_only_the_runs_still_in_from(member):
    """GIVEN held runs, some of which were stopped meanwhile WHEN they are released in bulk
    THEN only those still held move, each with exactly one event, and the ids say which."""
    actor = Actor(kind="user", user=member.user)
    _, sweep = held_plan(member, 6)
    ids = list(Run.objects.filter(sweep=sweep).order_by("id").values_list("id", flat=True))
    for run_id in ids[:2]:
        assert services.run_transition(run_id=run_id, to="stopped", actor=actor)
    moved = services.runs_transition(
        run_ids=ids, to="queued", from_=["held"], actor=actor, reason="plan_approved"
    )
    assert sorted(moved) == ids[2:]
    assert services.runs_transition(run_ids=ids, to="queued", from_=["held"], actor=actor) == []
    for run_id in ids[2:]:
        assert RunEvent.objects.filter(run_id=run_id, to_status="queued").count() == 1
    assert not RunEvent.objects.filter(run_id__in=ids[:2], to_status="queued").exists()


def test_gpu_confirmations_cost_the_same_for_10_and_100_runs(member):
    counts = {}
    for n in (10, 100):
        runs = RunFactory.create_batch(
            n, created_by=member.user, status="running", launched_at=timezone.now()
        )
        seen = {r.id: f"GPU {i} of node (pid {4000 + i})" for i, r in enumerate(runs)}
        counts[n] = queries(lambda seen=seen: services.run_gpus_confirm(seen=seen))
        confirmed = RunEvent.objects.filter(run__in=runs, reason="gpu_confirmed")
        assert confirmed.count() == n
        # Once per attempt: a second poll that sees them again confirms nothing.
        assert services.run_gpus_confirm(seen=seen) == []
    assert counts[10] == counts[100], counts


def test_a_grid_sweep_costs_the_same_for_10_and_100_runs(member):
    actor = Actor(kind="user", user=member.user)
    roles.is_admin(member.user)  # the owner's roles, cached on the user after the first read
    counts = {
        n: queries(
            lambda n=n: services.sweep_create_grid(
                actor=actor,
                name=f"g{n}",
                base_command="python train.py",
                parameters={"lr": list(range(n))},
                auto_start=True,
            )
        )
        for n in (10, 100)
    }
    assert counts[10] == counts[100], counts


# --- the poll ----------------------------------------------------------------------------


@pytest.fixture
def local_host(db, settings, tmp_path):
    """The local host with its run root in a directory the run user can read."""
    settings.DATA_DIR = tmp_path  # the server's copies of the logs
    with run_user_dir() as root:
        host = host_ensure_local()
        host.enabled, host.run_root = True, str(root)
        # As its first inventory leaves it: core count and memory known (stored once).
        host.cpu_count, host.memory_mb = local_machine()
        host.save(update_fields=["enabled", "run_root", "cpu_count", "memory_mb"])
        yield host


@pytest.fixture
def wrappers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Real processes standing in for the runs' wrappers; killed (by their group) at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def running_runs(host, member, procs, n: int, *, lines: int) -> list[Run]:
    """n running runs on the host, each with a live wrapper, some output, `lines` metric lines.

    The poll knows a live wrapper by its pid file and a command line that names the run
    directory's launch.sh: `bash -c 'sleep ...; :' DIR/launch.sh` is such a process."""
    runs = RunFactory.create_batch(
        n, created_by=member.user, status="running", host=host, launched_at=timezone.now()
    )
    for run in runs:
        d = Path(host.run_root, run.id)
        d.mkdir()
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell from data
            ["bash", "-c", "sleep 600; :", f"{d}/launch.sh"], start_new_session=True
        )
        procs.append(proc)
        (d / "pid").write_text(f"{proc.pid}\n")
        (d / "output.log").write_bytes(b"epoch 1\n")
        (d / "metrics.jsonl").write_text(
            "".join(f'{{"step": {s}, "loss": {1 / (s + 1)}, "acc": 0.5}}\n' for s in range(lines))
        )
    return runs


def test_a_poll_costs_the_same_for_10_and_100_runs(local_host, member, wrappers):
    """GIVEN a host with 10, then 100, running runs that each printed output and metric lines
    WHEN it is polled THEN the poll costs the same queries, every log and metric is copied,
    numbered without counting rows; a poll with nothing new costs the same for 10 and 100 too,
    and so does one that clears the runs' host_unreachable flags after an outage."""
    new, idle, back = {}, {}, {}
    for n in (10, 100):
        runs = running_runs(local_host, member, wrappers, n, lines=3)
        new[n] = queries(lambda: runner.host_sync(local_host.id))
        for run in Run.objects.filter(pk__in=[r.pk for r in runs]):
            assert run.status == "running" and run.log_size == len(b"epoch 1\n")
            assert set(run.metrics_latest) == {"loss", "acc"}
            seqs = list(
                Metric.objects.filter(run=run).order_by("seq").values_list("seq", flat=True)
            )
            assert seqs == list(range(6))
        idle[n] = queries(lambda: runner.host_sync(local_host.id))
        assert Metric.objects.filter(run__in=runs).count() == 6 * n, "nothing read twice"
        Run.objects.filter(pk__in=[r.pk for r in runs]).update(reason="host_unreachable")
        back[n] = queries(lambda: runner.host_sync(local_host.id))
        assert not Run.objects.filter(reason="host_unreachable").exists()
        # These runs are done with: the next round's poll sees only its own.
        Run.objects.filter(pk__in=[r.pk for r in runs]).update(status="finished")
    assert new[10] == new[100], new
    assert idle[10] == idle[100], idle
    assert back[10] == back[100], back


def test_new_metric_lines_continue_the_numbering(local_host, member, wrappers):
    """A run's next metric rows follow its earlier ones (seq kept on the run, not counted)."""
    (run,) = running_runs(local_host, member, wrappers, 1, lines=2)
    runner.host_sync(local_host.id)
    with Path(local_host.run_root, run.id, "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "loss": 0.01}\n')
    runner.host_sync(local_host.id)
    run.refresh_from_db()
    rows = list(Metric.objects.filter(run=run).order_by("seq").values_list("seq", "key", "step"))
    assert [seq for seq, _, _ in rows] == list(range(5))
    assert rows[-1] == (4, "loss", 9) and run.metrics_seq == 5
    assert run.metrics_latest["loss"] == {"step": 9, "value": 0.01}
