"""Redis (the broker) restarted in the middle of a burst: nothing is stuck once it is back.

The test runs a private redis-server on its own port and restarts that one, by pid: the
machine's own Redis is never touched.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis

from clusters.services import host_ensure_local
from experiments import services
from experiments.actors import Actor
from experiments.models import Run
from tests.harness.worker import Worker, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port)
        wait_for(lambda: _ping(client), 10, 0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.django_db(transaction=True)
def test_a_broker_restart_during_a_burst_leaves_nothing_stuck(member, tmp_path):
    broker = PrivateRedis(free_port())
    broker.start()
    worker = Worker(tmp_path, REDIS_URL=f"redis://127.0.0.1:{broker.port}/0")
    try:
        host_ensure_local()
        worker.start()
        actor = Actor(kind="user", user=member.user)
        ids = [
            services.run_create(
                actor=actor, command="sleep 0.5", name=f"b{i}", auto_start=True, kick=False
            ).id
            for i in range(30)
        ]
        wait_for(lambda: Run.objects.filter(pk__in=ids, status="finished").count() >= 3, 60)
        broker.stop()
        time.sleep(3)  # the worker and beat lose their broker for a while
        broker.start()
        wait_for(
            lambda: (
                Run.objects.filter(pk__in=ids, status__in=["finished", "failed", "stopped"]).count()
                == 30
            ),
            180,
            0.5,
        )
        assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"finished"}
        assert worker.proc is not None and worker.proc.poll() is None, "the worker survived"
    finally:
        worker.stop()
        broker.stop()
