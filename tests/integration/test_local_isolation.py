"""A member's run on the `local` host never gets the server's powers (issue 9, item 1).

The attack that worked: a run inherited DATABASE_URL, read data/keys/*.key and data/secret_key,
and inserted an admin token with psql. Here a member's run tries each of these for real, on a
real worker, and each must fail.
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess

import pytest
from django.conf import settings

from clusters import localuser
from clusters.executors import Executor, LaunchSpec, LocalTransport, RunRef
from clusters.models import Host
from clusters.services import host_ensure_local
from experiments import jobs, scheduler, services
from experiments.actors import Actor
from experiments.models import Run
from tests.harness.api import create, ended
from tests.harness.localruns import run_user_dir
from tests.harness.worker import wait_for

SECRET = "not-for-runs-7f3a9c"


@pytest.fixture
def local(celery_worker):
    return host_ensure_local()


def log_of(client, run_id: str) -> str:
    return client.get(f"/api/runs/{run_id}/logs", {"limit": 1_000_000}).json()["content"]


def test_the_machine_has_a_run_user():
    """make test creates it as root on Debian, as make up does; without it the rest of this
    file would test the admins-only fallback instead, so say so loudly."""
    assert localuser.run_user() is not None, localuser.why_no_run_user()


def test_a_members_run_gets_none_of_the_servers_powers(local, member, celery_worker):
    data = settings.DATA_DIR
    keys = data / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    (keys / "victim.key").write_text(SECRET)
    (keys / "victim.key").chmod(0o600)
    secret_key = data / "secret_key"
    assert secret_key.exists()
    server_pid = celery_worker.proc.pid
    q = shlex.quote
    command = "; ".join(
        [
            "echo uid=$(id -u)",
            "env | sort | sed 's/^/ENV /'",
            f"cat {q(str(keys / 'victim.key'))} && echo READ-KEY || echo DENIED-KEY",
            f"cat {q(str(secret_key))} >/dev/null && echo READ-SECRET || echo DENIED-SECRET",
            f"ls {q(str(data))} >/dev/null && echo LISTED-DATA || echo DENIED-DATA",
            f"cat /proc/{server_pid}/environ >/dev/null && echo READ-ENVIRON || echo DENIED-ENVIRON",
            f"kill -0 {server_pid} && echo SIGNALLED || echo NO-SIGNAL",
            'psql "$DATABASE_URL" -Atc "select 1" && echo DB-REACHED || echo NO-DB',
            "echo done",
        ]
    )
    run_id = create(member.client, name="attack", command=command)
    assert ended(run_id).status == "finished"
    out = log_of(member.client, run_id)
    assert "done" in out, out
    user = localuser.run_user()
    assert user is not None
    assert f"uid={user.uid}" in out and "uid=0" not in out
    env = dict(
        line[4:].split("=", 1)
        for line in out.splitlines()
        if line.startswith("ENV ") and "=" in line
    )
    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "LABSITE_DATA_DIR",
        "SECRET_KEY",
        "DJANGO_SETTINGS_MODULE",
    ):
        assert name not in env, f"the run inherited {name}"
    assert env["LABSITE_RUN_ID"] == run_id and env["HOME"] == user.home
    assert settings.REDIS_URL not in out
    assert SECRET not in out and "READ-KEY" not in out and "DENIED-KEY" in out
    assert "DENIED-SECRET" in out and "DENIED-DATA" in out and "DENIED-ENVIRON" in out
    assert "NO-SIGNAL" in out and "SIGNALLED" not in out.replace("NO-SIGNAL", "")
    assert "NO-DB" in out and "DB-REACHED" not in out


def test_the_copied_log_is_the_servers_alone(local, member):
    run_id = create(member.client, name="log", command="echo private")
    assert ended(run_id).status == "finished"
    path = settings.DATA_DIR / "logs" / f"{run_id}.log"
    assert path.read_text() == "private\n"
    assert path.stat().st_mode & 0o077 == 0 and path.parent.stat().st_mode & 0o077 == 0
    assert settings.DATA_DIR.stat().st_mode & 0o077 == 0


def test_a_run_cannot_override_its_pinning_or_its_run_id(db):
    """The API refuses such env names; should one reach the host anyway (an old row), the
    wrapper still sets Labsite's own variables last."""
    with run_user_dir() as root:
        spec = LaunchSpec(
            run_id="pin1",
            command='echo "CVD=$CUDA_VISIBLE_DEVICES RID=$LABSITE_RUN_ID ORDER=$CUDA_DEVICE_ORDER"',
            run_root=str(root),
            env={"CUDA_VISIBLE_DEVICES": "7", "LABSITE_RUN_ID": "someone-else", "X": "1"},
            cuda_visible_devices=[0],
        )
        executor = Executor(LocalTransport(localuser.run_user()))
        assert executor.launch(spec)
        report = wait_for(
            lambda: (
                (r := executor.poll([RunRef("pin1", str(root))])[0]["pin1"]).state == "exited" and r
            ),
            timeout=20,
        )
        assert report.log_chunk.decode().strip() == "CVD=0 RID=pin1 ORDER=PCI_BUS_ID"


def test_local_scripts_run_as_the_run_user_with_an_empty_environment(db, monkeypatch):
    """Not even the poll program sees the server's environment (it runs as the run user: a run
    that symlinked its output.log to the secret key would otherwise have it copied out)."""
    monkeypatch.setenv("LABSITE_CANARY", SECRET)
    user = localuser.run_user()
    assert user is not None
    result = LocalTransport(user).run("bash", "id -u; env", timeout=10)
    assert result.stdout.splitlines()[0] == str(user.uid)
    assert SECRET not in result.stdout and "DATABASE_URL" not in result.stdout
    with run_user_dir() as root:
        (root / "r1").mkdir()
        os.chown(root / "r1", user.uid, user.gid)
        os.symlink(settings.DATA_DIR / "secret_key", root / "r1" / "output.log")
        report = Executor(LocalTransport(user)).poll([RunRef("r1", str(root))])[0]["r1"]
        assert report.log_chunk == b"", "the poll followed a run's symlink into the data dir"


def test_make_up_creates_the_run_user_idempotently():
    """scripts/lib.sh's ensure_run_user, as make up and make test call it: the user is there
    (created once) and a second call changes nothing."""
    root = settings.BASE_DIR
    name = settings.LABSITE["LOCAL_RUN_USER"]
    before = pwd.getpwnam(name)
    done = subprocess.run(
        ["bash", "-c", "source scripts/lib.sh && ensure_run_user"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert pwd.getpwnam(name) == before
    assert os.stat(before.pw_dir).st_mode & 0o077 == 0


@pytest.mark.django_db
def test_a_members_run_waits_with_a_reason_where_there_is_no_run_user(
    member, admin, settings, monkeypatch
):
    """GIVEN no run user (a one-person machine without root) WHEN a member's CPU run is queued
    THEN it waits, saying why, while an admin's run goes to the local host; WHEN the lab trusts
    its members there THEN the member's run starts too. (No worker: the pass runs here, with
    this process's settings, and dispatches are recorded instead of sent.)"""
    monkeypatch.setattr(jobs, "_send", lambda *args, **kwargs: None)
    settings.LABSITE = {**settings.LABSITE, "LOCAL_RUN_USER": "", "LOCAL_TRUST_MEMBERS": False}
    host = host_ensure_local()
    Host.objects.filter(pk=host.pk).update(enabled=True)

    def queued(person):
        actor = Actor(kind="user", user=person.user)
        return services.run_create(actor=actor, command="true", gpus=0, auto_start=True, kick=False)

    mine, theirs = queued(member), queued(admin)
    scheduler.schedule_pass(full=True)
    waiting = Run.objects.get(pk=mine.pk)
    assert waiting.status == "queued"
    assert "admins' runs only" in waiting.waiting_reason
    assert "LABSITE_LOCAL_TRUST_MEMBERS" in waiting.waiting_reason
    placed = Run.objects.get(pk=theirs.pk)
    assert (placed.status, placed.host_id) == ("launching", host.pk)
    settings.LABSITE = {**settings.LABSITE, "LOCAL_TRUST_MEMBERS": True}
    scheduler.schedule_pass(full=True)
    assert Run.objects.get(pk=mine.pk).status == "launching"


@pytest.mark.django_db
def test_a_member_asking_for_the_local_host_is_told_why_not(member, admin, settings):
    settings.LABSITE = {**settings.LABSITE, "LOCAL_RUN_USER": "", "LOCAL_TRUST_MEMBERS": False}
    Host.objects.filter(pk=host_ensure_local().pk).update(enabled=True)
    body = {"command": "true", "host": "local", "auto_start": True}
    refused = member.client.post("/api/runs", body, format="json")
    assert refused.status_code == 400
    assert "admins' runs only" in refused.json()["detail"]
    assert not Run.objects.filter(created_by=member.user).exists()
    assert admin.client.post("/api/runs", body, format="json").status_code == 201


@pytest.mark.django_db
def test_bootstrap_moves_an_idle_local_host_out_of_the_data_dir(member):
    """A local host registered before the run user existed kept its runs in the data dir, which
    the run user cannot enter: bootstrap (make up) moves it to the run user's home, unless runs
    are still on it."""
    from io import StringIO

    from django.core.management import call_command

    old = str(settings.DATA_DIR / "runs")
    host = host_ensure_local()
    Host.objects.filter(pk=host.pk).update(run_root=old, enabled=True)
    busy = services.run_create(
        actor=Actor(kind="user", user=member.user), command="true", host=host, kick=False
    )
    Run.objects.filter(pk=busy.pk).update(status="running")
    call_command("bootstrap", stdout=StringIO(), stderr=StringIO())
    assert Host.objects.get(pk=host.pk).run_root == old
    Run.objects.filter(pk=busy.pk).update(status="finished")
    call_command("bootstrap", stdout=StringIO(), stderr=StringIO())
    assert Host.objects.get(pk=host.pk).run_root == "~/.labsite/runs"
