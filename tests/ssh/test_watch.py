"""The watcher over real sshd: a run's end wakes its host's poll within a second or so, with
poll ticks a minute apart; a follower that dies is replaced; stopping the watcher leaves no
follower on the host."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness.api import create, ended, register
from tests.harness.worker import Worker, redis_test_client, wait_for


def followers(home: str) -> list[int]:
    """The host's `tail -F` of its events file (the watcher's follower), by pid."""
    marker = f"{home}/.labsite/runs/.events".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"tail\0") and marker in cmdline:
            found.append(int(proc.name))
    return found


def lag(run_id: str, host) -> float:
    """Seconds from the command's end on the host to the end recorded in the database."""
    run = ended(run_id, timeout=20)
    assert run.status == "finished", run.error
    exit_file = Path(host.home) / ".labsite" / "runs" / run_id / "exit_code"
    assert run.ended_at is not None
    return run.ended_at.timestamp() - exit_file.stat().st_mtime


@pytest.mark.django_db(transaction=True)
def test_a_run_end_wakes_the_poll_of_its_host(fresh_lab, tmp_path, admin, member):
    """GIVEN poll ticks and reconcile passes a minute apart, and the watcher running
    WHEN a run on an SSH host ends THEN its end is recorded within 2 s (no tick did that);
    WHEN the follower on the host dies THEN the watcher starts another and the next end is seen
    as fast; WHEN the watcher stops THEN nothing of it is left on the host."""
    host = fresh_lab(n_hosts=1)[0]
    redis_test_client().flushdb()
    slow_ticks = {"LABSITE_POLL_INTERVAL_SECONDS": "60", "LABSITE_RECONCILE_INTERVAL_SECONDS": "60"}
    worker = Worker(tmp_path, **slow_ticks).start()
    try:
        register(admin, host)
        wait_for(lambda: f"watching {host.name}" in worker.watcher_log, 30)
        first = wait_for(lambda: followers(host.home), 10)
        assert lag(create(member.client, host, command="sleep 0.5"), host) < 2.0

        for pid in first:
            os.kill(pid, signal.SIGKILL)  # the follower we found, by its pid
        wait_for(lambda: (now := followers(host.home)) and set(now).isdisjoint(first), 15)
        assert lag(create(member.client, host, command="sleep 0.5"), host) < 2.0
    finally:
        worker.stop()
    deadline = time.monotonic() + 10
    while followers(host.home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert followers(host.home) == [], "a follower outlived the watcher"
