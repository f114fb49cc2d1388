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


# Asks the CUDA driver (not NVML, which ignores CUDA_VISIBLE_DEVICES) what the process can see.
CUDA_PROBE = """
import ctypes, os
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0, "cuInit failed"
count, dev = ctypes.c_int(), ctypes.c_int()
assert cuda.cuDeviceGetCount(ctypes.byref(count)) == 0
assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
raw = (ctypes.c_ubyte * 16)()
assert cuda.cuDeviceGetUuid(raw, dev) == 0
h = bytes(raw).hex()
print("CUDA", count.value, "GPU-%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:]))
print("PINNED", os.environ["CUDA_VISIBLE_DEVICES"], os.environ["CUDA_DEVICE_ORDER"])
"""


def test_a_pinned_run_sees_exactly_its_gpu(tmp_path):
    """GIVEN the last GPU by nvidia-smi's index WHEN a run is pinned to it THEN CUDA in the run
    sees one device, and it is that GPU (same UUID): indices mean what nvidia-smi shows."""
    last = gpus.read_nvml()[-1]
    (tmp_path / "probe.py").write_text(CUDA_PROBE)
    ex = Executor(LocalTransport())
    ex.launch(
        LaunchSpec(
            run_id="gpupin",
            command=f"{sys.executable} {tmp_path / 'probe.py'}",
            run_root=str(tmp_path),
            cuda_visible_devices=[last.index],
        )
    )
    for _ in range(300):
        report = ex.poll([RunRef("gpupin", str(tmp_path))])[0]["gpupin"]
        if report.state == "exited":
            break
        subprocess.run(["sleep", "0.1"], check=True)
    output = report.log_chunk.decode()
    assert report.exit_code == 0, output
    assert f"PINNED {last.index} PCI_BUS_ID" in output
    assert f"CUDA 1 {last.uuid}" in output, output
