"""Cluster detection against a real single-node Slurm, and a real GPU job on its fake GPUs."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from tests.harness.slurm import SlurmCluster
from tests.harness.worker import wait_for


def _slurm_host(state: dict[str, Any]) -> dict[str, Any]:
    hosts = [h for h in state["hosts"] if h["name"] == "slurm"]
    assert len(hosts) == 1, state["hosts"]
    return hosts[0]


def _check_state(state: dict[str, Any]) -> None:
    assert state["type"] == "slurm", state
    host = _slurm_host(state)
    assert host["kind"] == "slurm"
    partitions = {p["name"]: p for p in host["slurm"]["partitions"]}
    assert "gpu" in partitions, host["slurm"]
    gpu = partitions["gpu"]
    assert gpu["gpus"] == 4, gpu
    assert gpu["nodes"] == 1, gpu
    assert gpu["default"] is True, gpu
    assert state["gpu_count"] >= 4, state


def test_detect_reports_the_slurm_cluster(
    slurm_cluster: SlurmCluster, celery_worker: Any, member: Any
) -> None:
    """GIVEN a real Slurm WHEN an agent asks to detect THEN 202 at once (sinfo runs in the
    worker, never in the request) and GET /api/cluster shows the cluster soon after."""
    response = member.client.post("/api/cluster/detect")
    assert response.status_code == 202, response.content
    assert response.json()["detect"]["requested_at"]

    def detected() -> dict[str, Any] | None:
        state = member.client.get("/api/cluster").json()
        return state if any(h["name"] == "slurm" for h in state["hosts"]) else None

    _check_state(wait_for(detected, timeout=30, what="the slurm host in /api/cluster"))


def test_gres_job_gets_two_fake_gpus(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "cvd.txt"
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--gres=gpu:2",
            f"--chdir={tmp_path}",
            f"--output={tmp_path / 'job-%j.out'}",
            "--wrap",
            f"echo $CUDA_VISIBLE_DEVICES > {out}",
        ],
        capture_output=True,
        text=True,
        env=slurm_cluster.env,
        timeout=15,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    assert job_id.isdigit(), submit.stdout

    deadline = time.monotonic() + 30
    while not (out.exists() and out.read_text().endswith("\n")):
        if time.monotonic() > deadline:
            squeue = slurm_cluster.run("squeue", "-h", "-t", "all", "-j", job_id, check=False)
            raise AssertionError(f"job {job_id} wrote nothing in 30 s; squeue: {squeue}")
        time.sleep(0.05)
    assert out.read_text().strip() == "0,1"

    # The job finished cleanly (kept by squeue until MinJobAge; no accounting here).
    deadline = time.monotonic() + 15
    while True:
        state = slurm_cluster.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T").strip()
        if state == "COMPLETED" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert state == "COMPLETED", state
