"""A worker killed with SIGKILL (OOM killer, a slip of the hand) stops nothing for long: its
locks free within seconds, and `manage.py serve` starts it again while the site keeps serving."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from clusters.models import Host
from clusters.services import host_ensure_local
from experiments.models import Run
from labsite.management.commands.serve import Child
from tests.harness.worker import redis_test_client, wait_for
from tests.integration.test_up import (
    MANAGE,
    children_of,
    free_port,
    health,
    kill_all,
    serve_env,
    serve_log,
    start_serve,
    wait_until_up,
)

RUNS = 100
BEFORE_KILL = 30


def test_a_worker_killed_during_a_burst_loses_nothing_and_stalls_nothing(celery_worker, member):
    """GIVEN a burst of short runs on the local host WHEN the worker is killed with SIGKILL while
    it holds the scheduler's or the host's lock, and submissions go on while it is away THEN
    every submission is accepted, and once the worker is back every run finishes within 15 s
    (with a fixed two-minute TTL, the dead worker's locks held everything up that long)."""
    local = host_ensure_local()
    # `sleep` takes no CPU: an admin's override lets the burst run as it did before hosts had
    # CPU slots (this is about locks, not capacity; test_cpu_capacity is about that).
    Host.objects.filter(pk=local.pk).update(cpu_slots=100)
    locks = [f"labsite:poll:{local.id}", "labsite:scheduler"]
    redis = redis_test_client()

    def submit(i: int) -> str:
        body = {"name": f"crash-{i}", "command": "sleep 0.2", "auto_start": True}
        response = member.client.post("/api/runs", body, format="json")
        assert response.status_code == 201, response.content
        return str(response.json()["id"])

    ids = [submit(i) for i in range(BEFORE_KILL)]
    wait_for(
        lambda: Run.objects.filter(pk__in=ids, status="running").exists(), 30, 0.05, "a run started"
    )
    wait_for(lambda: redis.exists(*locks), 30, 0.001, "the worker holding a lock")
    celery_worker.kill9()
    held = [key for key in locks if redis.exists(key)]
    assert held, "the worker was killed holding no lock: this test would prove nothing"

    ids += [submit(i) for i in range(BEFORE_KILL, RUNS)]
    time.sleep(1)  # runs end while nobody watches them
    celery_worker.start()  # returns once the worker is ready: the 15 s count from here
    wait_for(
        lambda: Run.objects.filter(pk__in=ids, status="finished").count() == RUNS,
        15,
        0.2,
        f"all {RUNS} runs finished within 15 s of the worker's return (it died holding {held})",
    )
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"finished"}


def worker_child(serve_pid: int) -> int | None:
    """serve's Celery worker, told from gunicorn (whose argv says `--workers`) by its subcommand."""
    for pid in children_of(serve_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"worker" in argv:
            return pid
    return None


class HealthProbe(threading.Thread):
    """Asks the site for its health every 0.1 s and keeps every answer that was not "ok"."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.done = threading.Event()
        self.answers = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                status = health(self.port)["status"]
            except OSError as exc:
                status = repr(exc)
            self.answers += 1
            if status != "ok":
                self.failures.append(f"{time.strftime('%H:%M:%S')} {status}")


def test_serve_restarts_a_worker_killed_with_sigkill_and_the_site_keeps_serving(tmp_path):
    """GIVEN `manage.py serve` up WHEN its Celery worker is killed with SIGKILL THEN the site answers
    all along, web and the watcher stay as they were, a new worker (and its beat) comes up, and
    serve's log says which child died, how, and when it restarts."""
    redis_test_client().flushdb()
    env = serve_env(tmp_path)
    subprocess.run([*MANAGE, "migrate", "--noinput", "-v0"], env=env, check=True, timeout=300)
    subprocess.run([*MANAGE, "bootstrap"], env=env, capture_output=True, check=True, timeout=120)
    port = free_port()
    proc = start_serve(env, tmp_path, port)
    started: list[int] = []
    probe = HealthProbe(port)
    try:
        wait_until_up(proc, tmp_path, port)
        before = children_of(proc.pid)
        started += before
        old = worker_child(proc.pid)
        assert old is not None, "serve has no worker child"
        probe.start()
        os.kill(old, signal.SIGKILL)
        new = wait_for(
            lambda: (pid := worker_child(proc.pid)) not in (None, old) and pid,
            20,
            0.1,
            "a new worker child",
        )
        started.append(new)
        wait_for(lambda: serve_log(tmp_path).count(" ready.") >= 2, 60, 0.3, "the new worker ready")
        probe.done.set()
        probe.join(5)
        assert proc.poll() is None, "serve stopped"
        assert probe.answers >= 10 and not probe.failures, probe.failures
        assert sorted(children_of(proc.pid)) == sorted([p for p in before if p != old] + [new])
        assert f"serve: worker (pid {old}) was killed by SIGKILL; restarting it in 1 s" in (
            serve_log(tmp_path)
        )
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        probe.done.set()
        kill_all(proc, started)


def test_a_child_that_keeps_dying_waits_longer_each_time_and_starts_over_once_it_stayed_up():
    """GIVEN a supervised child that exits at once WHEN serve restarts it again and again THEN it
    waits 1, 2, 4, ... s, never more than 30 s, saying each time how the child ended; once a
    start stayed up a minute, the next death waits 1 s again."""
    child = Child("demo", ["sh", "-c", "exit 3"])
    child.start()
    delays = []
    now = time.monotonic()
    for _ in range(7):
        assert child.proc is not None
        child.proc.wait(10)
        line = child.check(now)
        assert line and f"serve: demo (pid {child.proc.pid}) exited with code 3; restarting" in line
        assert child.restart_at is not None
        delays.append(child.restart_at - now)
        now = child.restart_at
        assert child.check(now) is None and child.restart_at is None, "it was started again"
    assert delays == [1, 2, 4, 8, 16, 30, 30]

    child = Child("demo", ["sleep", "2"])
    child.backoff = 16
    child.start()
    assert child.check(child.started_at + 61) is None  # up for a minute and more
    assert child.proc is not None
    child.proc.wait(10)
    assert (line := child.check(time.monotonic())) and line.endswith("restarting it in 1 s")
