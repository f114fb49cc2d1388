"""Runs on a real single-node Slurm: submitted as jobs with their resources (as the run user),
followed by one squeue per poll, ended as Slurm says, stopped with scancel, submitted once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clusters.executors import LaunchSpec, executor_for
from clusters.models import Host
from clusters.services import slurm_detect
from experiments.models import Run, RunEvent
from tests.harness.localruns import run_user_dir
from tests.harness.slurm import SlurmCluster
from tests.harness.worker import wait_for

TERMINAL = {"finished", "failed", "stopped"}


def create(client: Any, **body: Any) -> str:
    response = client.post(
        "/api/runs", {"auto_start": True, "host": "slurm", **body}, format="json"
    )
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


def ended(run_id: str, timeout: float = 60) -> Run:
    return wait_for(
        lambda: (r := Run.objects.get(pk=run_id)).status in TERMINAL and r,
        timeout=timeout,
        what=f"run {run_id} to end",
    )


def job_fields(cluster: SlurmCluster, job_id: str) -> str:
    return cluster.run("scontrol", "show", "job", "-o", job_id)


def detected(cluster: SlurmCluster) -> Host:
    host = slurm_detect()
    assert host is not None
    assert host.facts["slurm_conf"] == str(cluster.conf_path)
    assert host.facts["version"].count(".") >= 1, host.facts
    parts = {p["name"]: p for p in host.facts["partitions"]}
    assert parts["gpu"]["max_gpus_per_node"] == 4 and parts["gpu"]["default"] is True
    assert parts["short"]["max_time_minutes"] == 10
    assert host.facts["gpus"] == 4, "the node is counted once, though in two partitions"
    return host


def test_runs_become_jobs_with_their_resources_and_end_as_slurm_says(
    slurm_cluster: SlurmCluster, celery_worker: Any, member: Any
) -> None:
    detected(slurm_cluster)
    ok = create(
        member.client,
        gpus=2,
        command='echo "gpus=$CUDA_VISIBLE_DEVICES job=$SLURM_JOB_ID"; echo done',
        slurm={"time": "5"},
    )
    bad = create(member.client, command="echo failing; exit 3", slurm={"partition": "short"})
    run = ended(ok)
    assert (run.status, run.exit_code, run.slurm_state) == ("finished", 0, "COMPLETED"), (
        run.status,
        run.error,
    )
    assert run.slurm_job_id.isdigit()
    log = member.client.get(f"/api/runs/{ok}/logs").json()["content"]
    # Slurm pinned the GPUs (Labsite sets no CUDA_VISIBLE_DEVICES on a Slurm host).
    assert f"gpus=0,1 job={run.slurm_job_id}" in log, log
    fields = job_fields(slurm_cluster, run.slurm_job_id)
    assert f"JobName=labsite-{ok}" in fields and "TimeLimit=00:05:00" in fields, fields
    assert "gres/gpu=2" in fields or "gpu:2" in fields, fields
    assert RunEvent.objects.filter(run_id=ok, reason="slurm_submitted").count() == 1
    failed = ended(bad)
    assert (failed.status, failed.reason, failed.exit_code) == ("failed", "exit_code", 3)
    assert "Partition=short" in job_fields(slurm_cluster, failed.slurm_job_id)
    # The cluster's default walltime, never UNLIMITED: the short partition's 10 minutes.
    assert "TimeLimit=00:10:00" in job_fields(slurm_cluster, failed.slurm_job_id)


def test_a_pending_job_says_why_and_stopping_cancels_pending_and_running_jobs(
    slurm_cluster: SlurmCluster, celery_worker: Any, member: Any
) -> None:
    detected(slurm_cluster)
    hog = create(member.client, gpus=4, command="sleep 120")
    wait_for(lambda: Run.objects.get(pk=hog).status == "running", timeout=30, what="hog runs")
    waiter = create(member.client, gpus=4, command="echo never")

    def waiting() -> Run | None:
        run = Run.objects.get(pk=waiter)
        words = run.waiting_reason
        return run if run.slurm_state == "PENDING" and "waiting for resources" in words else None

    run = wait_for(waiting, timeout=60, what="the second job pending for resources")
    assert run.status == "launching"
    assert run.waiting_reason == "Slurm: waiting for resources (partition gpu)"
    shown = member.client.get(f"/api/runs/{waiter}").json()
    assert shown["waiting_reason"] == run.waiting_reason and shown["slurm_state"] == "PENDING"
    for run_id in (waiter, hog):
        response = member.client.post(f"/api/runs/{run_id}/stop")
        assert response.status_code == 200, response.content
    for run_id in (waiter, hog):
        run = ended(run_id, timeout=60)
        assert (run.status, run.reason) == ("stopped", "user_stop"), (run.status, run.error)
        state = slurm_cluster.run(
            "squeue", "-h", "-t", "all", "-j", run.slurm_job_id, "-o", "%T"
        ).strip()
        assert state == "CANCELLED", state
    assert "echo never" not in member.client.get(f"/api/runs/{waiter}/logs").json()["content"]


def test_a_run_is_submitted_once_however_often_its_submission_is_retried(
    slurm_cluster: SlurmCluster, db: None
) -> None:
    """A worker killed mid-submit retries: the job id recorded, or else the job's name in
    squeue, finds the first submission."""
    host = detected(slurm_cluster)
    executor = executor_for(host)
    with run_user_dir() as where:
        _submit_thrice(slurm_cluster, executor, str(where / "runs"), where / "runs")


def _submit_thrice(slurm_cluster: SlurmCluster, executor: Any, root: str, path: Path) -> None:
    spec = LaunchSpec(run_id="once1", command="sleep 30", run_root=root, sbatch_args=("--time=1",))
    first = executor.submit(spec)  # type: ignore[attr-defined]
    assert first is not None and first.isdigit()
    assert executor.submit(spec) == first  # type: ignore[attr-defined]
    (path / "once1" / "job_id").unlink()  # as if killed before recording it
    assert executor.submit(spec) == first  # type: ignore[attr-defined]
    jobs = slurm_cluster.run("squeue", "-h", "-n", "labsite-once1", "-o", "%i").split()
    assert jobs == [first]
    left = executor.cancel(run_id="once1", run_root=root, grace_seconds=5)
    assert left == 0
    # Cancelled: a later submission (a dispatch resent) starts nothing.
    assert executor.submit(spec) is None  # type: ignore[attr-defined]


def test_a_burst_of_submissions_is_paced_by_the_clusters_bucket(
    slurm_cluster: SlurmCluster, transactional_db: None, member: Any, tmp_path: Path
) -> None:
    """GIVEN a bucket of 2 submissions at once, 1 a second WHEN 6 runs are created at once THEN
    all 6 become jobs, paced: the last submitted at least 3 s after the first."""
    from tests.harness.worker import Worker, redis_test_client

    redis_test_client().flushdb()
    detected(slurm_cluster)
    worker = Worker(
        tmp_path, LABSITE_SLURM_SUBMIT_BURST="2", LABSITE_SLURM_SUBMITS_PER_SECOND="1"
    ).start()
    try:
        ids = [create(member.client, command="true") for _ in range(6)]
        for run_id in ids:
            assert ended(run_id).status == "finished"
    finally:
        worker.stop()
    stamps = sorted(
        RunEvent.objects.filter(run_id__in=ids, reason="slurm_submitted").values_list(
            "created_at", flat=True
        )
    )
    assert len(stamps) == 6, "each run submitted once"
    assert (stamps[-1] - stamps[0]).total_seconds() >= 3.0, stamps


def test_with_accounting_sacct_gives_the_end_of_jobs_squeue_no_longer_shows(
    slurm_cluster: SlurmCluster, db: None, monkeypatch: Any
) -> None:
    """GIVEN a cluster with slurmdbd (on a private MariaDB) WHEN a poll covers runs whose jobs
    squeue does not show under their names THEN one sacct over their ids says how each ended:
    the exit code, the node, and who cancelled it."""
    assert slurm_detect().facts["accounting"] is False, "the plain cluster keeps no accounting"
    from clusters.executors import RunRef

    with SlurmCluster(accounting=True) as acct:
        monkeypatch.setenv("SLURM_CONF", str(acct.conf_path))
        host = slurm_detect()
        assert host is not None and host.facts["accounting"] is True
        out = "--output=/dev/null"
        failed = acct.run("sbatch", "--parsable", out, "--wrap", "exit 3").strip()
        held = acct.run("sbatch", "--parsable", out, "--hold", "--wrap", "true").strip()
        acct.run("scancel", held)

        def both_ended() -> bool:
            rows = acct.run(
                "sacct", "--parsable2", "-n", "-X", "-j", f"{failed},{held}", "-o", "JobID,State"
            ).split("\n")
            states = dict(row.split("|", 1) for row in rows if "|" in row)
            return states.get(failed) == "FAILED" and states.get(held, "").startswith("CANCELLED")

        wait_for(both_ended, timeout=30, what="both jobs in accounting")
        with run_user_dir() as where:
            refs = [
                RunRef("acct1", str(where), job_id=failed),
                RunRef("acct2", str(where), job_id=held),
            ]
            reports, _ = executor_for(host).poll(refs)
        one, two = reports["acct1"], reports["acct2"]
        assert one.slurm_polled and one.slurm is not None, one
        assert (one.slurm.state, one.slurm.exit_code, one.slurm.nodes) == ("FAILED", 3, "localhost")
        assert two.slurm is not None and (two.slurm.state, two.slurm.by) == ("CANCELLED", "root")
