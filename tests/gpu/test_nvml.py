"""The gpu tier: NVML inventory, foreign processes, pinning and the whole local GPU run path on a
real NVIDIA GPU (skipped where none exists). CUDA is driven through libcuda with ctypes, so the
tier needs the driver and nothing else (no PyTorch)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusters import gpus, localuser
from clusters.executors import Executor, LaunchSpec, LocalTransport, RunRef
from clusters.models import Gpu
from clusters.services import inventory_refresh_local, local_pid_runs
from experiments import rundir, runner, scheduler, selectors, services
from experiments.actors import Actor
from experiments.models import GpuLease, Run, RunEvent
from tests.harness.localruns import run_user_dir
from tests.harness.worker import wait_for

pytestmark = pytest.mark.gpu

# Shared by the probes below: load the driver and take device 0 of what the process may see.
CUDA = """
import ctypes, os, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
def ok(code, what):
    if code != 0:
        sys.exit("%s failed with CUresult %d" % (what, code))
ok(cuda.cuInit(0), "cuInit")
count, dev = ctypes.c_int(), ctypes.c_int()
ok(cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
"""

# What a pinned process sees (NVML ignores CUDA_VISIBLE_DEVICES; the CUDA driver does not).
PROBE = (
    CUDA
    + """
raw = (ctypes.c_ubyte * 16)()
get_uuid = getattr(cuda, "cuDeviceGetUuid_v2", None) or cuda.cuDeviceGetUuid
ok(get_uuid(raw, dev), "cuDeviceGetUuid")
h = bytes(raw).hex()
print("CUDA", count.value, "GPU-%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:]))
print("PINNED", os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("CUDA_DEVICE_ORDER"))
"""
)

# A compute process holding MB MiB on its device 0: until stdin closes, or for SECONDS.
HOLD = (
    CUDA
    + """
ctx, ptr = ctypes.c_void_p(), ctypes.c_uint64()
ok(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
ok(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
ok(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(int(sys.argv[1]) << 20)), "cuMemAlloc")
print("HOLDING", os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
else:
    sys.stdin.read()
"""
)


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Someone else's process (no LABSITE_RUN_ID) holding 2 GiB on the last GPU."""
    last = gpus.read_nvml()[-1]
    (tmp_path / "hold.py").write_text(HOLD)
    env = {"PATH": "/usr/bin:/bin", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    env["CUDA_VISIBLE_DEVICES"] = str(last.index)
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "hold.py"), "2048"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith("HOLDING"), (
        "the holder could not allocate on the GPU"
    )
    yield proc
    if proc.poll() is None:  # stopped by its pid, never by name
        proc.kill()
        proc.wait(timeout=10)


def test_nvml_reads_every_gpu_as_nvidia_smi_does():
    """Same GPUs, names, totals, and memory used as nvidia-smi counts it (NVML's v1 call adds the
    driver's reserved memory: 480 MiB on an idle H100 that nvidia-smi shows at 0)."""
    before = gpus.read_nvml()
    assert before, "NVML found no GPU"
    smi = gpus.read_nvidia_smi_local()
    after = gpus.read_nvml()
    assert [g.uuid for g in before] == [g.uuid for g in smi] == [g.uuid for g in after]
    for a, b, c in zip(before, smi, after, strict=True):
        assert a.index == b.index and a.name == b.name
        assert a.memory_total_mb == b.memory_total_mb, (a, b)
        low, high = min(a.memory_used_mb, c.memory_used_mb), max(a.memory_used_mb, c.memory_used_mb)
        assert low - 64 <= b.memory_used_mb <= high + 64, (
            f"GPU {a.index}: NVML says {a.memory_used_mb}/{c.memory_used_mb} MiB used, "
            f"nvidia-smi {b.memory_used_mb} MiB"
        )


@pytest.mark.django_db
def test_the_local_host_is_a_gpu_host():
    host = inventory_refresh_local()
    assert host.gpu_source == "nvml" and host.gpus.filter(present=True).count() >= 1


@pytest.mark.django_db
def test_a_foreign_process_is_seen_by_nvml_and_nvidia_smi_and_its_gpu_is_busy(foreign):
    """GIVEN someone else's process holding 2 GiB on the last GPU WHEN the server's inventory and
    an ssh host's poll (nvidia-smi inside the poll program) read the GPUs THEN both list its pid
    with its memory, as nobody's run, and the GPU is busy_foreign; once it exits the GPU is free."""
    last = gpus.read_nvml()[-1]

    def nvml_pids() -> dict[int, int]:
        state = next(g for g in gpus.read_nvml() if g.uuid == last.uuid)
        return {p.pid: p.used_memory_mb for p in state.processes}

    seen = wait_for(
        lambda: foreign.pid in nvml_pids() and nvml_pids(), what="NVML listing the holder"
    )
    assert seen[foreign.pid] >= 2048, seen

    _, report = Executor(LocalTransport()).poll([], gpu=True)
    assert report is not None and not report.error, report
    polled = gpus.merge(
        gpus.parse_query_gpu(report.query_gpu), gpus.parse_query_apps(report.query_apps)
    )
    smi = next(g for g in polled if g.uuid == last.uuid)
    assert foreign.pid in {p.pid for p in smi.processes}, report.query_apps
    assert foreign.pid not in report.pid_runs

    host = inventory_refresh_local()
    gpu = Gpu.objects.get(uuid=last.uuid)
    assert {"pid": foreign.pid, "run_id": None} in [
        {"pid": p["pid"], "run_id": p["run_id"]} for p in gpu.processes
    ], gpu.processes
    assert selectors.gpu_state(gpu, leased=False, host=host) == selectors.GPU_FOREIGN

    assert foreign.stdin is not None
    foreign.stdin.close()
    foreign.wait(timeout=30)
    wait_for(lambda: foreign.pid not in nvml_pids(), what="NVML dropping the holder")
    inventory_refresh_local()
    gpu.refresh_from_db()
    assert gpu.processes == [], gpu.processes
    assert selectors.gpu_state(gpu, leased=False, host=host) == selectors.GPU_FREE, (
        f"an idle GPU reads as busy: {gpu.memory_used_mb} MiB used, {gpu.utilization_pct} %"
    )


def test_a_pinned_run_sees_exactly_its_gpu(tmp_path):
    """GIVEN the last GPU by nvidia-smi's index WHEN a run is pinned to it THEN CUDA in the run
    sees one device, and it is that GPU (same UUID): indices mean what nvidia-smi shows."""
    last = gpus.read_nvml()[-1]
    (tmp_path / "probe.py").write_text(PROBE)
    ex = Executor(LocalTransport())
    ex.launch(
        LaunchSpec(
            run_id="gpupin",
            command=f"{sys.executable} {tmp_path / 'probe.py'}",
            run_root=str(tmp_path),
            cuda_visible_devices=[last.index],
        )
    )
    report = wait_for(
        lambda: (
            (r := ex.poll([RunRef("gpupin", str(tmp_path))])[0]["gpupin"]).state == "exited" and r
        ),
        what="the probe exiting",
    )
    output = report.log_chunk.decode()
    assert report.exit_code == 0, output
    assert f"PINNED {last.index} PCI_BUS_ID" in output
    assert f"CUDA 1 {last.uuid}" in output, output


@pytest.mark.django_db
def test_a_gpu_run_is_placed_pinned_confirmed_and_released(admin):
    """GIVEN the server's own GPUs WHEN a run asking for 1 GPU goes through the scheduler, the
    launch and the polls THEN it leases a free GPU, runs on that GPU only, the poll confirms it
    there (its process carries its LABSITE_RUN_ID), and the lease is released when it ends.
    An admin's run: on a machine without a run user the local host takes admins' runs only."""
    with run_user_dir() as scratch:
        _run_through_the_scheduler(admin, scratch)


def _run_through_the_scheduler(admin, scratch):  # type: ignore[no-untyped-def]
    host = inventory_refresh_local()
    host.enabled, host.run_root = True, str(scratch / "runs")
    host.save(update_fields=["enabled", "run_root"])
    (scratch / "hold.py").write_text(HOLD)
    (scratch / "hold.py").chmod(0o644)
    python = localuser.python_for(localuser.run_user())
    run = services.run_create(
        actor=Actor(kind="user", user=admin.user),
        command=f"{python} {scratch / 'hold.py'} 512 6",
        gpus=1,
        gpuwrap_config={"enabled": True, "retries": -1, "retry_delay_seconds": 30},
        auto_start=True,
        kick=False,
    )
    scheduler.schedule_pass()
    run.refresh_from_db()
    assert run.status == "launching", (run.status, run.waiting_reason)
    lease = GpuLease.objects.select_related("gpu").get(run=run, released_at__isnull=True)
    runner.run_dispatch(run.id)
    assert Run.objects.get(pk=run.pk).status == "running"

    def confirmed() -> bool:
        runner.host_sync(host.id)
        return RunEvent.objects.filter(run=run, reason="gpu_confirmed").exists()

    wait_for(confirmed, what="the poll confirming the run on its GPU")
    event = RunEvent.objects.get(run=run, reason="gpu_confirmed")
    assert f"GPU {lease.gpu.index} of local" in event.message, event.message
    assert not run.alerts.exists(), list(run.alerts.values_list("message", flat=True))

    def ended() -> Run | None:
        runner.host_sync(host.id)
        r = Run.objects.get(pk=run.pk)
        return r if r.status not in ("launching", "running") else None

    done = wait_for(ended, what="the run ending")
    assert done.status == "finished", (done.status, done.error)
    assert "HOLDING" in (Path(rundir.log_path(run.id)).read_text()), "the run never held its GPU"
    assert not GpuLease.objects.filter(run=run, released_at__isnull=True).exists()
    assert local_pid_runs(gpus.read_nvml()) == {}
