"""A Slurm cluster reached through a login node over SSH: a namespace host whose Slurm client
configuration (/etc/slurm/slurm.conf, as on a real login node) points at the test slurmctld.
Registered with POST /api/hosts like an ssh host (key pinned), detected over SSH, and its runs
submitted, followed and stopped there, as the local cluster's are."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusters.models import Host
from experiments.models import Run, RunEvent
from tests.harness.api import create, ended, register
from tests.harness.slurm import SlurmCluster
from tests.harness.sshhosts import SshLab, missing_prerequisites
from tests.harness.worker import wait_for


@pytest.fixture
def login_lab(slurm_cluster: SlurmCluster) -> Iterator[SshLab]:
    """Two namespace hosts: lshost1 a login node of the test cluster, lshost2 a machine with
    Slurm's commands but no configuration (its sinfo cannot answer)."""
    problems = missing_prerequisites()
    if problems:
        pytest.fail("SSH test hosts unavailable: " + "; ".join(problems), pytrace=False)
    with SshLab(n_hosts=2) as lab:
        login = lab[0]
        etc = Path(login.dir) / "etc-slurm"
        etc.mkdir()
        assert slurm_cluster.conf_path is not None
        conf = slurm_cluster.conf_path.read_text()
        # The controller as the namespace reaches it: the lab's bridge, not 127.0.0.1 (which
        # is the namespace's own loopback there).
        mine = conf.replace(
            "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldHost=localhost({lab.gateway_ip})"
        )
        assert mine != conf
        (etc / "slurm.conf").write_text(mine)
        # Its own mount namespace only: the machine's /etc/slurm is not touched.
        login.exec(f"mount --bind {etc} /etc/slurm", check=True)
        # The login node's own sbatch (its /usr/local/bin) notes each call, then submits.
        login.write_bin(
            "sbatch", '#!/bin/sh\necho "$@" >> "$HOME/sbatch-calls"\nexec /usr/bin/sbatch "$@"\n'
        )
        yield lab


def test_a_login_node_over_ssh_works_like_the_local_one(
    login_lab: SshLab, slurm_cluster: SlurmCluster, celery_worker: Any, admin: Any, member: Any
) -> None:
    login, other = login_lab[0], login_lab[1]
    shown = register(admin, login, kind="slurm", run_root=login.run_root)
    assert shown["state"] == "online", shown
    assert shown["host_key_fingerprint"] == login.host_key_fingerprint, "pinned at first contact"
    assert shown["gpu_source"] == "slurm"
    host = Host.objects.get(name=login.name)
    # Detected over SSH: sinfo, its version and sacct, from the login node.
    parts = {p["name"]: p for p in host.facts["partitions"]}
    assert parts["gpu"]["max_gpus_per_node"] == 4 and parts["short"]["max_time_minutes"] == 10
    assert host.facts["gpus"] == 4 and host.facts["version"].count(".") >= 1, host.facts
    assert host.facts["accounting"] is False and host.facts["slurm_conf"] == ""
    cluster = member.client.get("/api/cluster").json()
    [row] = [h for h in cluster["hosts"] if h["name"] == login.name]
    assert row["slurm"]["gpus"] == 4, row

    # Checked against what the login node's Slurm said, before anything is submitted.
    bad = member.client.post(
        "/api/runs",
        {"host": login.name, "command": "true", "slurm": {"partition": "nosuch"}},
        format="json",
    )
    assert bad.status_code == 400 and "gpu, short" in bad.content.decode(), bad.content

    ok = create(
        member.client,
        login,
        gpus=2,
        command='echo "gpus=$CUDA_VISIBLE_DEVICES on $(hostname)"',
        slurm={"time": "5"},
    )
    failing = create(member.client, login, command="exit 3")
    run = ended(ok, timeout=90)
    assert (run.status, run.exit_code, run.slurm_state) == ("finished", 0, "COMPLETED"), (
        run.status,
        run.error,
    )
    log = member.client.get(f"/api/runs/{ok}/logs").json()["content"]
    assert "gpus=0,1 on " in log, log
    # Submitted on the login node (over SSH), not from this machine.
    calls = (Path(login.home) / "sbatch-calls").read_text()
    assert f"--job-name=labsite-{ok}" in calls, calls
    job = slurm_cluster.run("scontrol", "show", "job", "-o", run.slurm_job_id)
    assert f"StdOut={login.run_root}/{ok}" in job, job
    failed = ended(failing, timeout=90)
    assert (failed.status, failed.reason, failed.exit_code) == ("failed", "exit_code", 3)

    # Stopped while it runs: scancel on the login node.
    long = create(member.client, login, command="sleep 300")
    wait_for(lambda: Run.objects.get(pk=long).status == "running", 60, what="the long job runs")
    assert member.client.post(f"/api/runs/{long}/stop").status_code == 200
    stopped = ended(long, timeout=60)
    assert (stopped.status, stopped.reason) == ("stopped", "user_stop"), stopped.error
    state = slurm_cluster.run("squeue", "-h", "-t", "all", "-j", stopped.slurm_job_id, "-o", "%T")
    assert state.strip() == "CANCELLED", state
    polled = member.client.get(f"/api/hosts/{login.name}").json()
    assert polled["slurm_calls_per_minute"] >= 5 and polled["slurm_poll_seconds"] >= 2.0, polled

    # A login node whose Slurm cannot answer is registered, pinned, and offline with why.
    shown = register(admin, other, kind="slurm", run_root=other.run_root)
    assert shown["state"] == "offline", shown
    assert shown["host_key_fingerprint"] == other.host_key_fingerprint
    assert shown["state_note"].startswith("Slurm did not answer: sinfo"), shown["state_note"]


def test_a_worker_killed_mid_submit_submits_once(
    login_lab: SshLab, slurm_cluster: SlurmCluster, celery_worker: Any, admin: Any, member: Any
) -> None:
    """GIVEN a submission whose sbatch has answered Slurm but not yet Labsite (the login node's
    sbatch lingers 5 s after it submitted) WHEN the worker is killed with SIGKILL there and
    started again THEN the run's job is found by its name, never submitted a second time, and
    the run finishes."""
    login = login_lab[0]
    login.write_bin(
        "sbatch",
        '#!/bin/sh\necho "$@" >> "$HOME/sbatch-calls"\n/usr/bin/sbatch "$@"\ncode=$?\n'
        "sleep 5\nexit $code\n",
    )
    register(admin, login, kind="slurm", run_root=login.run_root)
    run_id = create(member.client, login, command="echo once")
    name = f"labsite-{run_id}"

    def in_slurm() -> bool:
        out = slurm_cluster.run("squeue", "-h", "-t", "all", "-n", name, "-o", "%i")
        return bool(out.split())

    wait_for(in_slurm, timeout=30, what="the job submitted")
    started = time.monotonic()
    celery_worker.kill9()
    assert time.monotonic() - started < 4, "killed while the submission was still on its way"
    assert not (Path(login.run_root) / run_id / "job_id").exists(), "its id was not recorded"
    celery_worker.start()
    run = ended(run_id, timeout=90)
    assert (run.status, run.exit_code) == ("finished", 0), (run.status, run.error)
    jobs = slurm_cluster.run("squeue", "-h", "-t", "all", "-n", name, "-o", "%i").split()
    assert jobs == [run.slurm_job_id], jobs
    calls = (Path(login.home) / "sbatch-calls").read_text()
    assert calls.count(f"--job-name={name}") == 1, calls
    assert "once" in member.client.get(f"/api/runs/{run_id}/logs").json()["content"]
    assert RunEvent.objects.filter(run_id=run_id, to_status="launching").count() == 1
