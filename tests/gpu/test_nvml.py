"""The gpu tier: NVML inventory and pinning on a real NVIDIA GPU (skipped where none exists)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clusters import gpus
from clusters.executors import Executor, LaunchSpec, LocalTransport, RunRef
from clusters.services import inventory_refresh_local

pytestmark = pytest.mark.gpu


def test_nvml_reads_every_gpu_as_nvidia_smi_does():
    states = gpus.read_nvml()
    assert states, "NVML found no GPU"
    smi = gpus.read_nvidia_smi_local()
    assert [g.uuid for g in states] == [g.uuid for g in smi]
    for a, b in zip(states, smi, strict=True):
        assert a.memory_total_mb == b.memory_total_mb and a.name == b.name


@pytest.mark.django_db
def test_the_local_host_is_a_gpu_host():
    host = inventory_refresh_local()
    assert host.gpu_source == "nvml" and host.gpus.filter(present=True).count() >= 1


def test_a_pinned_run_sees_exactly_its_gpu(tmp_path):
    last = gpus.read_nvml()[-1]
    probe = (
        f'{sys.executable} -c "import pynvml as n; n.nvmlInit(); '
        'print(n.nvmlDeviceGetCount())"; nvidia-smi -L | wc -l; echo $CUDA_VISIBLE_DEVICES'
    )
    ex = Executor(LocalTransport())
    ex.launch(
        LaunchSpec(
            run_id="gpupin",
            command=probe,
            run_root=str(tmp_path),
            cuda_visible_devices=[last.index],
        )
    )
    for _ in range(100):
        report = ex.poll([RunRef("gpupin", str(tmp_path))])[0]["gpupin"]
        if report.state == "exited":
            break
        subprocess.run(["sleep", "0.1"], check=True)
    assert report.exit_code == 0
    lines = report.log_chunk.decode().split()
    assert lines[-1] == str(last.index)
