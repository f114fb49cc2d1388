"""What the local run user can reach of the server's services, checked as that user (issue 9,
item 1: "cannot reach the database with the server's credentials").

A run that gets no credentials can still reach a Redis without a password (and send the
server's Celery tasks, or FLUSHDB) or a PostgreSQL that trusts local connections (and be any
role). The local host's probe connects as the run user; where anything answers without a
password, members' runs do not go to the local host, and they are told why. Real servers
here: two redis-servers of our own (one with a password), and a PostgreSQL cluster of our own
that trusts its Unix socket and asks a password over TCP. Each is stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import pytest

from clusters import localuser
from clusters.executors import Executor, LocalTransport
from clusters.models import Host
from clusters.services import host_check_run_user_reach, host_ensure_local
from experiments import jobs, scheduler, services
from experiments.actors import Actor
from experiments.models import Run
from tests.harness.ports import free_port, wait_port

pytestmark = pytest.mark.integration


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def redises() -> Iterator[tuple[int, int]]:
    """(port of a Redis without a password, port of one with a password)."""
    ports = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
        )
        for port, extra in zip(ports, ([], ["--requirepass", "s3cret-for-the-server"]), strict=True)
    ]
    try:
        for port in ports:
            wait_port(port)
        yield ports
    finally:
        for proc in procs:
            stop(proc)


@pytest.fixture
def postgres() -> Iterator[tuple[int, str]]:
    """A cluster of our own: trust on its Unix socket, a password over TCP. (port, socket)"""
    binaries = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
    assert binaries, "PostgreSQL's server binaries are missing (make test installs them)"
    bindir = Path(binaries[-1]).parent
    top = Path(tempfile.mkdtemp(prefix="labsite-reach-"))
    top.chmod(0o755)  # the run user must be able to reach the socket inside
    data, sockets = top / "data", top / "sockets"
    port = free_port()
    proc = None
    try:
        for path in (data, sockets):
            path.mkdir()
            shutil.chown(path, "postgres", "postgres")
        sockets.chmod(0o755)
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "labsite_reach",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        proc = subprocess.Popen(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(sockets),
                "-c",
                "listen_addresses=127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(port)
        yield port, str(sockets / f".s.PGSQL.{port}")
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(top, ignore_errors=True)


def reaches(targets: list[dict[str, object]]) -> list[str]:
    user = localuser.run_user()
    assert user is not None, localuser.why_no_run_user()
    return Executor(LocalTransport(user)).reach(targets)


def test_the_run_user_reaches_what_answers_without_a_password(redises, postgres):
    open_redis, locked_redis = redises
    pg_port, pg_socket = postgres
    pg = {"kind": "postgres", "user": "labsite_reach", "database": "postgres"}
    targets = [
        {"name": "open redis", "kind": "redis", "host": "127.0.0.1", "port": open_redis},
        {"name": "locked redis", "kind": "redis", "host": "127.0.0.1", "port": locked_redis},
        {"name": "pg socket", **pg, "path": pg_socket},
        {"name": "pg tcp", **pg, "host": "127.0.0.1", "port": pg_port},
        {"name": "nothing there", "kind": "redis", "host": "127.0.0.1", "port": free_port()},
    ]
    assert reaches(targets) == ["open redis", "pg socket"]


@pytest.mark.django_db
def test_the_local_probe_records_it_and_members_wait_with_the_reason(
    redises, member, admin, settings, monkeypatch
):
    """GIVEN the server's broker is a Redis without a password WHEN the local host is probed
    THEN it records that the run user reaches it, and a member's run waits saying so while an
    admin's starts; GIVEN a Redis with a password THEN nothing is recorded and members run."""
    monkeypatch.setattr(jobs, "_send", lambda *args, **kwargs: None)
    open_redis, locked_redis = redises
    settings.LABSITE = {**settings.LABSITE, "LOCAL_TRUST_MEMBERS": False}
    # The broker only: what the machine's own PostgreSQL allows is not this test's to choose.
    targets = localuser.reach_targets
    monkeypatch.setattr(
        localuser, "reach_targets", lambda: [t for t in targets() if t["kind"] == "redis"]
    )
    host = host_ensure_local()
    Host.objects.filter(pk=host.pk).update(enabled=True)
    assert "not checked yet" in (localuser.local_refusal() or "")

    url = f"redis://127.0.0.1:{open_redis}/3"
    settings.REDIS_URL = settings.CELERY_BROKER_URL = url
    host_check_run_user_reach(Host.objects.get(pk=host.pk))
    assert Host.objects.get(pk=host.pk).facts[localuser.REACHES] == [
        f"Redis at 127.0.0.1:{open_redis}"
    ]

    def queued(person):
        actor = Actor(kind="user", user=person.user)
        return services.run_create(actor=actor, command="true", gpus=0, auto_start=True, kick=False)

    mine, theirs = queued(member), queued(admin)
    scheduler.schedule_pass(full=True)
    waiting = Run.objects.get(pk=mine.pk)
    assert waiting.status == "queued"
    assert f"can reach Redis at 127.0.0.1:{open_redis} without a password" in (
        waiting.waiting_reason
    )
    assert Run.objects.get(pk=theirs.pk).status == "launching"
    shown = admin.client.get("/api/hosts/local").json()["members_refused"]
    assert f"Redis at 127.0.0.1:{open_redis}" in shown
    refused = member.client.post(
        "/api/runs", {"command": "true", "host": "local", "auto_start": True}, format="json"
    )
    assert refused.status_code == 400
    assert "without a password" in refused.json()["detail"]

    url = f"redis://:s3cret-for-the-server@127.0.0.1:{locked_redis}/3"
    settings.REDIS_URL = settings.CELERY_BROKER_URL = url
    host_check_run_user_reach(Host.objects.get(pk=host.pk))
    assert Host.objects.get(pk=host.pk).facts[localuser.REACHES] == []
    assert admin.client.get("/api/hosts/local").json()["members_refused"] is None
    scheduler.schedule_pass(full=True)
    assert Run.objects.get(pk=mine.pk).status == "launching"


def test_the_targets_are_the_servers_broker_and_database():
    """reach_targets names the server's Redis and, for PostgreSQL, its TCP address and the
    default Unix socket, as the server's role (never with its password)."""
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": "5433",
        "USER": "lab",
        "PASSWORD": "never-sent",
        "NAME": "labsite",
    }
    targets = localuser.reach_targets(["redis://:pw@127.0.0.1:6390/4"], database)
    assert targets[0] == {
        "name": "Redis at 127.0.0.1:6390",
        "kind": "redis",
        "host": "127.0.0.1",
        "port": 6390,
    }
    assert targets[1]["host"] == "127.0.0.1" and targets[1]["port"] == 5433
    assert (targets[1]["user"], targets[1]["database"]) == ("lab", "labsite")
    assert "never-sent" not in repr(targets) and "pw" not in repr(targets[0])
    sockets = [t for t in targets if "path" in t]
    assert all(t["path"] == "/var/run/postgresql/.s.PGSQL.5433" for t in sockets)
    assert bool(sockets) == os.path.exists("/var/run/postgresql/.s.PGSQL.5433")
    sqlite = {"ENGINE": "django.db.backends.sqlite3", "NAME": "/data/db.sqlite3"}
    assert localuser.reach_targets(["unix:///data/redis.sock"], sqlite) == [
        {"name": "Redis at /data/redis.sock", "kind": "redis", "path": "/data/redis.sock"}
    ]
