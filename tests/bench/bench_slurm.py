"""Benchmarks of runs on a real single-node Slurm (tests/harness/slurm.py): what Labsite adds
to a submission, the Slurm calls of one poll at 500 jobs, and a 1,000-element array against
1,000 single jobs.

- submit -> RUNNING in Slurm: `POST /api/runs` (a real worker places and submits it) against
  `sbatch` called directly, each until squeue says RUNNING, one job after another. (The run's
  own status follows at its cluster's next poll: LABSITE_SLURM_POLL_SECONDS.)
- one poll of 500 jobs: the Slurm commands the poll made (its squeue, and a sacct only where
  accounting is on and jobs left squeue) and its wall time.
- submitting 1,000 runs as one array (sbatch_array.sh) against 1,000 sbatch.sh calls.
- a burst of 500 runs at the default pace: the RPCs slurmctld counted (sdiag) against its own
  rate limit at its defaults (Slurm 22.05 has no rate limit to trip: its algorithm is
  replayed over the counts).

`make bench` runs it against a scratch PostgreSQL database; writes bench-results/slurm.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "labsite.settings")
django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from clusters import localuser  # noqa: E402
from clusters.executors import LaunchSpec, RunRef, SlurmExecutor, executor_for  # noqa: E402
from clusters.services import slurm_detect  # noqa: E402
from labsite.models import ApiToken  # noqa: E402
from labsite.roles import assign_role  # noqa: E402
from tests.harness.localruns import run_user_dir  # noqa: E402
from tests.harness.slurm import SlurmCluster  # noqa: E402
from tests.harness.worker import Worker, redis_test_client, wait_for  # noqa: E402

N_SUBMIT = int(os.environ.get("BENCH_SLURM_SUBMITS", "20"))
N_JOBS = int(os.environ.get("BENCH_SLURM_JOBS", "500"))
N_ARRAY = int(os.environ.get("BENCH_SLURM_ARRAY", "1000"))
N_BURST = int(os.environ.get("BENCH_SLURM_BURST", "500"))
# Slurm's own RPC rate limit at its defaults (slurm.conf SlurmctldParameters=rl_enable):
# a bucket of rl_bucket_size tokens per user, rl_refill_rate more every rl_refill_period s.
RL_BUCKET, RL_REFILL, RL_PERIOD = 30, 2, 1.0


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def running(cluster: SlurmCluster, job_id: str) -> bool:
    return cluster.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).strip() == "RUNNING"


GAP = 0.3  # between one job's end and the next submission, the same for both


def gone(cluster: SlurmCluster, job_id: str) -> bool:
    state = cluster.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).strip()
    return state in ("", "CANCELLED", "COMPLETED")


def sbatch_alone(cluster: SlurmCluster) -> tuple[list[float], list[float]]:
    """(to accepted: sbatch returned a job id; to RUNNING in squeue), in ms."""
    accepted, started = [], []
    for _ in range(N_SUBMIT):
        began = time.perf_counter()
        job = cluster.run("sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 60")
        job = job.strip().split(";")[0]
        accepted.append((time.perf_counter() - began) * 1000)
        wait_for(lambda j=job: running(cluster, j), 30, 0.005)
        started.append((time.perf_counter() - began) * 1000)
        cluster.run("scancel", job)
        wait_for(lambda j=job: gone(cluster, j), 30, 0.01)
        time.sleep(GAP)
    return accepted, started


def through_labsite(cluster: SlurmCluster, api: APIClient) -> tuple[list[float], list[float]]:
    """(to accepted: the run's job id recorded; to RUNNING in squeue), in ms."""
    from experiments.models import Run

    accepted, started = [], []
    for i in range(N_SUBMIT):
        began = time.perf_counter()
        response = api.post(
            "/api/runs",
            {"command": "sleep 60", "name": f"lat-{i}", "host": "slurm", "auto_start": True},
            format="json",
        )
        assert response.status_code == 201, response.content
        run_id = response.json()["id"]
        job = wait_for(lambda r=run_id: Run.objects.get(pk=r).slurm_job_id, 30, 0.002)
        accepted.append((time.perf_counter() - began) * 1000)
        wait_for(lambda j=job: running(cluster, j), 30, 0.005)
        started.append((time.perf_counter() - began) * 1000)
        assert api.post(f"/api/runs/{run_id}/stop").status_code == 200
        wait_for(lambda r=run_id: Run.objects.get(pk=r).status == "stopped", 60, 0.05)
        time.sleep(GAP)
    return accepted, started


def user_rpcs(cluster: SlurmCluster, user: str) -> int:
    """The RPCs slurmctld has counted for this user since it started (sdiag, by user)."""
    for line in cluster.run("sdiag").splitlines():
        fields = line.split()
        if fields and fields[0] == user:
            for field in fields:
                if field.startswith("count:"):
                    return int(field.removeprefix("count:"))
    return 0


def refused_by_rl(samples: list[tuple[float, int]]) -> int:
    """How many of these RPCs (cumulative counts at times) Slurm's limiter at its defaults
    would have refused: RL_BUCKET tokens, RL_REFILL more at each RL_PERIOD."""
    tokens, refused = float(RL_BUCKET), 0
    start = samples[0][0]
    last_period, last_count = 0, samples[0][1]
    for at, count in samples[1:]:
        period = int((at - start) / RL_PERIOD)
        tokens = min(RL_BUCKET, tokens + RL_REFILL * (period - last_period))
        last_period = period
        tokens -= count - last_count
        last_count = count
        if tokens < 0:
            refused += int(-tokens)
            tokens = 0
    return refused


def burst(cluster: SlurmCluster, api: APIClient, submitter: str) -> dict[str, float]:
    """N_BURST runs created at once through the API, submitted by a worker at the default
    pace: how long until every job id is known, and the submitting user's RPCs as slurmctld
    counted them (sampled every 0.2 s), replayed through Slurm's limiter at its defaults."""
    from experiments.models import Run

    samples = [(time.monotonic(), user_rpcs(cluster, submitter))]
    began = time.monotonic()
    ids = []
    for i in range(N_BURST):
        response = api.post(
            "/api/runs",
            {"command": "true", "name": f"burst-{i}", "host": "slurm", "auto_start": True},
            format="json",
        )
        assert response.status_code == 201, response.content
        ids.append(response.json()["id"])
    created_s = time.monotonic() - began
    while Run.objects.filter(pk__in=ids, slurm_job_id="").exists():
        samples.append((time.monotonic(), user_rpcs(cluster, submitter)))
        assert time.monotonic() - began < N_BURST * 2 + 120, "the burst did not go through"
        time.sleep(0.2)
    submitted_s = time.monotonic() - began
    samples.append((time.monotonic(), user_rpcs(cluster, submitter)))
    counts = [c for _, c in samples]
    per_second = 0
    for i, (at, count) in enumerate(samples):
        later = [c for t, c in samples[i:] if t - at <= 1.0]
        per_second = max(per_second, later[-1] - count)
    failed = Run.objects.filter(pk__in=ids, status="failed").count()
    return {
        "created_s": created_s,
        "submitted_s": submitted_s,
        "rpcs": counts[-1] - counts[0],
        "peak_per_second": per_second,
        "refused": refused_by_rl(samples),
        "failed": failed,
    }


def specs(root: str, prefix: str, n: int) -> list[LaunchSpec]:
    return [
        LaunchSpec(
            run_id=f"{prefix}{i}",
            command="true",
            run_root=root,
            sbatch_args=("--time=5", "--hold"),  # held: nothing runs, the queue stays full
        )
        for i in range(n)
    ]


def main() -> None:
    assert connection.vendor == "postgresql", "the benchmark runs on PostgreSQL"
    redis_test_client().flushdb()
    user, _ = get_user_model().objects.get_or_create(username="bench-slurm")
    assign_role(user, "member")
    _, token = ApiToken.issue(user)
    api = APIClient(HTTP_HOST="localhost")
    api.credentials(HTTP_X_AUTH_TOKEN=token)
    logs = ROOT / "bench-results" / "worker-logs-slurm"
    logs.mkdir(parents=True, exist_ok=True)
    with SlurmCluster(cpus=8) as cluster:
        os.environ["SLURM_CONF"] = str(cluster.conf_path)
        host = slurm_detect()
        assert host is not None
        alone = sbatch_alone(cluster)
        worker = Worker(logs, LABSITE_SLURM_SUBMIT_BURST="1000").start()
        try:
            labsite = through_labsite(cluster, api)
        finally:
            worker.stop()
        user = localuser.run_user()
        submitter = user.name if user is not None else cluster.run("id", "-un").strip()
        # The burst at the default pace (LABSITE_SLURM_SUBMITS_PER_SECOND, _SUBMIT_BURST).
        worker = Worker(logs).start()
        try:
            bursting = burst(cluster, api, submitter)
        finally:
            worker.stop()
        cluster.run("scancel", "-u", submitter, check=False)
        executor = executor_for(host)
        assert isinstance(executor, SlurmExecutor)
        with run_user_dir() as where:
            root = str(where / "runs")
            began = time.perf_counter()
            for spec in specs(root, "single", N_ARRAY):
                executor.submit(spec)
            singles_s = time.perf_counter() - began
            many = specs(root, "poll", max(0, N_JOBS - N_ARRAY))
            for spec in many:
                executor.submit(spec)
            refs = [RunRef(f"single{i}", root) for i in range(min(N_JOBS, N_ARRAY))]
            refs += [RunRef(s.run_id, root) for s in many]
            executor.calls = 0
            began = time.perf_counter()
            reports, _ = executor.poll(refs)
            poll_ms = (time.perf_counter() - began) * 1000
            poll_calls = executor.calls
            seen = sum(1 for r in reports.values() if r.slurm is not None)
            cluster.run("scancel", "-u", submitter, check=False)
            began = time.perf_counter()
            jobs = executor.submit_array(
                specs(root, "array", N_ARRAY),
                job_name="labsite-array-bench",
                throttle=8,
                list_path=f"{root}/.arrays/bench.list",
            )
            array_s = time.perf_counter() - began
            assert len(set(jobs)) == N_ARRAY
        os.environ.pop("SLURM_CONF", None)
    redis_test_client().flushdb()
    lines = [
        f"# Runs on Slurm (measured {time.strftime('%Y-%m-%d %H:%M')} UTC, single-node Slurm "
        "22.05 on the 2-core machine)",
        "",
        f"One job after another, each {GAP} s after the one before has left Slurm's queue.",
        "Accepted: `sbatch` returned (alone) / the run's job id is recorded (through Labsite).",
        "RUNNING: squeue says so; most of it is Slurm's own scheduling cycle, the same for both.",
        "",
        "| submit -> | sbatch alone p50 / p95 ms | through Labsite p50 / p95 ms | "
        "Labsite's overhead, p50 ms |",
        "|---|---:|---:|---:|",
        *(
            f"| {what} | {statistics.median(a):.0f} / {pct(a, 95):.0f} | "
            f"{statistics.median(b):.0f} / {pct(b, 95):.0f} | "
            f"{statistics.median(b) - statistics.median(a):.0f} |"
            for what, a, b in (
                ("accepted", alone[0], labsite[0]),
                ("RUNNING", alone[1], labsite[1]),
            )
        ),
        "",
        f"| one poll of {len(refs)} runs whose jobs are in Slurm's queue | value |",
        "|---|---:|",
        f"| Slurm commands made (squeue; sacct only for jobs gone from squeue) | {poll_calls} |",
        f"| jobs the poll saw | {seen} |",
        f"| wall time | {poll_ms:.0f} ms |",
        "",
        f"{N_BURST} runs created at once through the API (in {bursting['created_s']:.1f} s), "
        "submitted one job each at the default pace (1 a second, 20 at once); the "
        "submitting user's RPCs as slurmctld counted them (sdiag), replayed through Slurm's "
        f"own limiter at its defaults (a bucket of {RL_BUCKET}, {RL_REFILL} a second):",
        "",
        "| burst | value |",
        "|---|---:|",
        f"| every job id known after | {bursting['submitted_s']:.0f} s |",
        f"| RPCs to slurmctld (submissions and polls) | {bursting['rpcs']:.0f} |",
        f"| most RPCs in one second | {bursting['peak_per_second']:.0f} |",
        f"| RPCs Slurm's limiter would have refused | {bursting['refused']:.0f} |",
        f"| runs failed | {bursting['failed']:.0f} |",
        "",
        f"| submitting {N_ARRAY} runs | seconds |",
        "|---|---:|",
        f"| as {N_ARRAY} single jobs (sbatch.sh each) | {singles_s:.1f} |",
        f"| as one job array (sbatch_array.sh) | {array_s:.1f} |",
    ]
    table = "\n".join(lines)
    print(table)
    (ROOT / "bench-results" / "slurm.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
