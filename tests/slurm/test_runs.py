"""Runs on a real single-node Slurm: submitted as jobs with their resources (as the run user),
followed by one squeue per poll, ended as Slurm says, stopped with scancel, submitted once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clusters import slurm
from clusters.executors import LaunchSpec, executor_for
from clusters.models import Host
from clusters.services import host_probe, slurm_detect
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


def another_cluster(cluster: SlurmCluster, name: str) -> Host:
    """A second cluster of this machine, as an admin registers it: a Slurm host with its own
    SLURM_CONF, detected by its probe. (Not the host `slurm`: that one is this machine's own
    SLURM_CONF, which the worker's inventory refresh detects again.)"""
    host = Host.objects.create(
        name=name, kind="slurm", hostname="localhost", facts={"slurm_conf": str(cluster.conf_path)}
    )
    host, state = host_probe(host.pk)
    assert state == "online" and host.facts["slurm_conf"] == str(cluster.conf_path), host.facts
    assert host.facts["partitions"], host.facts
    return host


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
    # Asked with --gpus (where a cluster wants it) rather than --gres: two GPUs all the same.
    by_gpus = create(
        member.client,
        gpus=2,
        command='echo "gpus=$CUDA_VISIBLE_DEVICES"',
        slurm={"gpu_option": "gpus"},
    )
    bad = create(member.client, command="echo failing; exit 3", slurm={"partition": "short"})
    # Slurm itself refuses it (no node has the feature): the run fails with Slurm's words.
    refused = create(member.client, command="true", slurm={"constraint": "nosuchfeature"})
    run = ended(ok)
    assert (run.status, run.exit_code, run.slurm_state) == ("finished", 0, "COMPLETED"), (
        run.status,
        run.error,
    )
    assert run.slurm_job_id.isdigit()
    # Its GPU-hours count Slurm's own run time of the job (squeue's %M), not the polls'.
    assert run.slurm_elapsed_seconds is not None and 0 <= run.slurm_elapsed_seconds <= 30, (
        run.slurm_elapsed_seconds
    )
    log = member.client.get(f"/api/runs/{ok}/logs").json()["content"]
    # Slurm pinned the GPUs (Labsite sets no CUDA_VISIBLE_DEVICES on a Slurm host).
    assert f"gpus=0,1 job={run.slurm_job_id}" in log, log
    fields = job_fields(slurm_cluster, run.slurm_job_id)
    assert f"JobName=labsite-{ok}" in fields and "TimeLimit=00:05:00" in fields, fields
    assert "gres/gpu=2" in fields or "gpu:2" in fields, fields
    assert RunEvent.objects.filter(run_id=ok, reason="slurm_submitted").count() == 1
    other = ended(by_gpus)
    assert (other.status, other.exit_code) == ("finished", 0), (other.status, other.error)
    shown = member.client.get(f"/api/runs/{by_gpus}/logs").json()["content"]
    assert len(shown.split("gpus=", 1)[1].split()[0].split(",")) == 2, shown
    fields = job_fields(slurm_cluster, other.slurm_job_id)
    assert "TresPerJob=gres:gpu:2" in fields or "TresPerJob=gpu:2" in fields, fields
    failed = ended(bad)
    assert (failed.status, failed.reason, failed.exit_code) == ("failed", "exit_code", 3)
    assert "Partition=short" in job_fields(slurm_cluster, failed.slurm_job_id)
    # The cluster's default walltime, never UNLIMITED: the short partition's 10 minutes.
    assert "TimeLimit=00:10:00" in job_fields(slurm_cluster, failed.slurm_job_id)
    no = ended(refused)
    assert (no.status, no.reason) == ("failed", "launch_error"), (no.status, no.error)
    assert "sbatch:" in no.error and not no.slurm_job_id, no.error
    # The submissions (an sbatch each: their run directories are new) and the polls, counted
    # on the host.
    shown = member.client.get("/api/hosts/slurm").json()
    assert shown["slurm_calls_per_minute"] >= 5, shown
    assert shown["slurm_poll_seconds"] >= 2.0, shown


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
        assert slurm.parse_elapsed(one.slurm.elapsed) is not None, one.slurm
        assert two.slurm is not None and (two.slurm.state, two.slurm.by) == ("CANCELLED", "root")


def test_a_sweep_goes_as_one_job_array_each_element_a_run_with_its_own_log(
    slurm_cluster: SlurmCluster, celery_worker: Any, member: Any
) -> None:
    """GIVEN a grid sweep of 3 on the Slurm host with an array throttle of 2 WHEN it starts THEN
    one sbatch makes one array (`--array=0-2%2`), each element one run with its own log and exit
    code; stopping one element cancels it alone."""
    detected(slurm_cluster)
    response = member.client.post(
        "/api/sweeps",
        {
            "name": "arr",
            # The grid appends --x=N: $1 of this little script.
            "base_command": 'bash -c \'echo "$1 task=$SLURM_ARRAY_TASK_ID"; '
            '[ "$1" != --x=3 ] || sleep 120\' grid',
            "parameters": {"x": [1, 2, 3]},
            "host": "slurm",
            "slurm_array_throttle": 2,
            "auto_start": True,
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["slurm_array_throttle"] == 2
    ids = {run["params"]["x"]: run["id"] for run in response.json()["runs"]}
    for x in (1, 2):
        run = ended(ids[x])
        assert (run.status, run.exit_code) == ("finished", 0), (run.status, run.error)
        log = member.client.get(f"/api/runs/{ids[x]}/logs").json()["content"]
        assert f"--x={x} task=" in log and "--x=3" not in log, log
    long = wait_for(lambda: (r := Run.objects.get(pk=ids[3])).status == "running" and r, timeout=60)
    jobs = {Run.objects.get(pk=ids[x]).slurm_job_id for x in (1, 2, 3)}
    arrays = {job.split("_")[0] for job in jobs}
    assert len(arrays) == 1 and all("_" in job for job in jobs), jobs
    (array,) = arrays
    assert "ArrayTaskThrottle=2" in job_fields(slurm_cluster, array), job_fields(
        slurm_cluster, array
    )
    assert member.client.post(f"/api/runs/{ids[3]}/stop").status_code == 200
    stopped = ended(ids[3])
    assert (stopped.status, stopped.reason) == ("stopped", "user_stop"), stopped.error
    state = slurm_cluster.run(
        "squeue", "-h", "-r", "-t", "all", "-j", long.slurm_job_id, "-o", "%T"
    ).strip()
    assert state == "CANCELLED", state
    assert {Run.objects.get(pk=ids[x]).status for x in (1, 2)} == {"finished"}
    bad = member.client.post(
        "/api/sweeps",
        {
            "name": "no",
            "base_command": "t {x}",
            "parameters": {"x": [1]},
            "slurm_array_throttle": 2,
        },
        format="json",
    )
    assert bad.status_code == 400 and b"Slurm host" in bad.content


def test_an_array_of_20_runs_4_at_a_time_and_a_job_past_its_time_limit_times_out(
    slurm_cluster: SlurmCluster, celery_worker: Any, member: Any
) -> None:
    """GIVEN 8 CPUs WHEN a 20-element array with throttle 4 runs (elements of 1 CPU, 1 s each)
    THEN never more than 4 run at once (and several do), and each element's run has its own
    exit code; a job asked for 1 minute that takes longer ends failed with reason timeout."""
    detected(slurm_cluster)
    late = create(member.client, command="sleep 300", slurm={"time": "1"})
    response = member.client.post(
        "/api/sweeps",
        {
            "name": "twenty",
            # The grid appends --x=N; element N exits N % 3.
            "base_command": "bash -c 'sleep 1; exit $(( ${1#--x=} % 3 ))' grid",
            "parameters": {"x": list(range(20))},
            "host": "slurm",
            "slurm_array_throttle": 4,
            "auto_start": True,
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    ids = {run["params"]["x"]: run["id"] for run in response.json()["runs"]}
    first = wait_for(
        lambda: Run.objects.get(pk=ids[0]).slurm_job_id, timeout=30, what="the array submitted"
    )
    array = first.split("_")[0]
    most = 0

    def all_ended() -> bool:
        nonlocal most
        running = slurm_cluster.run("squeue", "-h", "-r", "-t", "R,CG", "-j", array, "-o", "%i")
        most = max(most, len(running.split()))
        return Run.objects.filter(pk__in=ids.values(), status__in=TERMINAL).count() == 20

    wait_for(all_ended, timeout=120, interval=0.1, what="the 20 runs to end")
    assert 3 <= most <= 4, f"{most} elements ran at once"
    for x, run_id in ids.items():
        run = Run.objects.get(pk=run_id)
        assert run.exit_code == x % 3, (x, run.exit_code, run.error)
        assert run.status == ("finished" if x % 3 == 0 else "failed"), (x, run.status)
        assert run.slurm_job_id.startswith(f"{array}_")
    assert len({Run.objects.get(pk=i).slurm_job_id for i in ids.values()}) == 20
    timed_out = ended(late, timeout=180)
    assert (timed_out.status, timed_out.reason) == ("failed", "timeout"), (
        timed_out.status,
        timed_out.reason,
        timed_out.error,
    )
    assert timed_out.slurm_state == "TIMEOUT"


def test_slurmctld_restarted_while_a_job_runs_loses_nothing(
    slurm_cluster: SlurmCluster, celery_worker: Any, member: Any
) -> None:
    detected(slurm_cluster)
    run_id = create(member.client, command="sleep 8; echo survived")
    wait_for(lambda: Run.objects.get(pk=run_id).status == "running", timeout=30, what="running")
    slurm_cluster.restart_slurmctld()
    run = ended(run_id, timeout=90)
    assert (run.status, run.exit_code) == ("finished", 0), (run.status, run.error)
    assert "survived" in member.client.get(f"/api/runs/{run_id}/logs").json()["content"]
    assert RunEvent.objects.filter(run_id=run_id, reason="slurm_submitted").count() == 1


def test_a_job_over_its_memory_fails_with_reason_oom_where_the_cluster_enforces_memory(
    slurm_cluster: SlurmCluster, celery_worker: Any, member: Any
) -> None:
    """GIVEN a cluster where memory is a consumable resource and a job over its --mem is killed
    WHEN a run asks 64 MB and takes 400 THEN it fails with reason oom (host memory, not
    cuda_oom) and Slurm's words; a run within its memory finishes."""
    with SlurmCluster(cpus=4, enforce_memory=True) as strict:
        another_cluster(strict, "strict")
        hog = create(
            member.client,
            host="strict",
            memory_mb=64,
            command="python3 -c \"import time; x = b'1' * (400 << 20); time.sleep(60)\"; "
            "echo survived",
        )
        fine = create(
            member.client,
            host="strict",
            memory_mb=64,
            command="python3 -c \"print(len(b'1' * (8 << 20)))\"",
        )
        run = ended(hog, timeout=90)
        assert (run.status, run.reason) == ("failed", "oom"), (run.status, run.reason, run.error)
        assert "exceeded memory limit (" in run.error and "67108864" in run.error, run.error
        fields = strict.run("scontrol", "show", "job", "-o", run.slurm_job_id)
        assert "mem=64M" in fields, fields
        log = member.client.get(f"/api/runs/{hog}/logs").json()["content"]
        assert "survived" not in log, log
        ok = ended(fine, timeout=90)
        assert (ok.status, ok.exit_code) == ("finished", 0), (ok.status, ok.error)


def test_a_job_whose_node_fails_goes_again_without_that_node_where_the_run_allows_retries(
    slurm_cluster: SlurmCluster, celery_worker: Any, member: Any
) -> None:
    """GIVEN a cluster that never requeues a job itself, and two running runs WHEN their node
    goes down THEN the run that allows no retries fails (node_fail, the node named) and the
    other is submitted again as its next attempt, with that node excluded: its new job waits
    for the cluster's other node."""
    with SlurmCluster(cpus=4, job_requeue=False, spare_node=True) as flaky:
        another_cluster(flaky, "flaky")
        again = create(
            member.client,
            host="flaky",
            gpus=1,
            command="sleep 300",
        )
        once = create(
            member.client,
            host="flaky",
            gpus=1,
            command="sleep 300",
            gpuwrap_config={"retries": 0},
        )
        for run_id in (again, once):
            wait_for(
                lambda run_id=run_id: Run.objects.get(pk=run_id).status == "running",
                timeout=60,
                what=f"run {run_id} running",
            )
        first = Run.objects.get(pk=again).slurm_job_id
        assert "Requeue=0" in job_fields(flaky, Run.objects.get(pk=once).slurm_job_id)
        flaky.run("scontrol", "update", "nodename=localhost", "state=down", "reason=labsite-test")
        failed = ended(once, timeout=60)
        assert (failed.status, failed.reason) == ("failed", "node_fail"), failed.error
        assert "NODE_FAIL on localhost" in failed.error, failed.error

        def next_attempt() -> Run | None:
            run = Run.objects.get(pk=again)
            if run.attempt == 2 and run.slurm_job_id and run.slurm_job_id != first:
                return run
            return None

        run = wait_for(next_attempt, timeout=60, what="the run's second attempt submitted")
        assert run.status == "launching" and run.slurm == {"exclude": "localhost"}, run.slurm
        fields = job_fields(flaky, run.slurm_job_id)
        assert f"JobName=labsite-{again}-a2" in fields and "ExcNodeList=localhost" in fields, fields
        old = flaky.run("squeue", "-h", "-t", "all", "-j", first, "-o", "%T").strip()
        assert old == "NODE_FAIL", old
        event = RunEvent.objects.get(run_id=again, reason="slurm_node_fail_requeue")
        assert "without localhost, attempt 2 of 3" in event.message, event.message
        # Its new job is taken (the cluster has another node), and waits for that node.
        run = wait_for(
            lambda: (r := Run.objects.get(pk=again)).slurm_state == "PENDING" and r,
            timeout=30,
            what="the new job pending",
        )
        assert run.waiting_reason == (
            "Slurm: a node it asks is not available (UnavailableNodes:spare) (partition gpu)"
        ), run.waiting_reason
        assert member.client.post(f"/api/runs/{again}/stop").status_code == 200
        stopped = ended(again, timeout=60)
        assert (stopped.status, stopped.attempt) == ("stopped", 2), stopped.error


def test_a_job_that_ends_while_no_worker_runs_gets_its_exit_code_from_the_next(
    slurm_cluster: SlurmCluster, celery_worker: Any, member: Any
) -> None:
    """GIVEN a running job WHEN the worker (and its beat) is stopped and the job ends meanwhile
    THEN the next worker gives the run its end: failed, with the job's exit code."""
    detected(slurm_cluster)
    run_id = create(member.client, command="sleep 10; exit 3")
    job = wait_for(lambda: Run.objects.get(pk=run_id).slurm_job_id, timeout=60, what="submitted")

    def state() -> str:
        return slurm_cluster.run("squeue", "-h", "-t", "all", "-j", job, "-o", "%T").strip()

    # Stopped once Slurm runs it (the run's own status follows at the cluster's next poll,
    # which may or may not have come by then).
    wait_for(lambda: state() == "RUNNING", timeout=30, what="the job running")
    celery_worker.stop()
    wait_for(lambda: state() == "FAILED", timeout=30, what="the job's end in Slurm")
    assert Run.objects.get(pk=run_id).status in ("launching", "running"), "nobody saw it end"
    celery_worker.start()
    run = ended(run_id, timeout=60)
    assert (run.status, run.reason, run.exit_code) == ("failed", "exit_code", 3), run.error
