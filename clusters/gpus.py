"""GPU inventory: parse nvidia-smi, read NVML, and decide whether a GPU is free by policy.

Pure functions over plain data; the services store the results.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

QUERY_GPU_ARGS = [
    "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu",
    "--format=csv,noheader,nounits",
]
QUERY_APPS_ARGS = [
    "--query-compute-apps=gpu_uuid,pid,used_memory",
    "--format=csv,noheader,nounits",
]


class InventoryError(Exception):
    """The host's GPU tool answered, but not with something we can trust."""


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_mb: int


@dataclass
class GpuState:
    index: int
    uuid: str
    name: str
    memory_total_mb: int
    memory_used_mb: int
    utilization_pct: int
    processes: list[GpuProcess] = field(default_factory=list)


@dataclass(frozen=True)
class GpuPolicy:
    """When a GPU counts as free: thresholds from the lab defaults or the host's overrides."""

    max_memory_used_mb: int = 1024
    max_utilization_pct: int = 20


def _number(text: str, what: str) -> int:
    text = text.strip()
    if text in ("[N/A]", "N/A", "[Not Supported]"):
        return 0
    try:
        return int(float(text))
    except ValueError as exc:
        raise InventoryError(f"nvidia-smi printed {text!r} for {what}") from exc


def parse_query_gpu(text: str) -> list[GpuState]:
    """Rows of `--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu`."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 6 or not parts[1].startswith("GPU-"):
            raise InventoryError(f"unexpected nvidia-smi line: {line.strip()[:120]!r}")
        gpus.append(
            GpuState(
                index=_number(parts[0], "index"),
                uuid=parts[1],
                name=parts[2],
                memory_total_mb=_number(parts[3], "memory.total"),
                memory_used_mb=_number(parts[4], "memory.used"),
                utilization_pct=_number(parts[5], "utilization.gpu"),
            )
        )
    return gpus


def parse_query_apps(text: str) -> dict[str, list[GpuProcess]]:
    """Rows of `--query-compute-apps=gpu_uuid,pid,used_memory`, grouped by GPU UUID."""
    apps: dict[str, list[GpuProcess]] = {}
    for line in text.splitlines():
        if not line.strip() or "No running" in line:
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0].startswith("GPU-"):
            raise InventoryError(f"unexpected nvidia-smi line: {line.strip()[:120]!r}")
        apps.setdefault(parts[0], []).append(
            GpuProcess(
                pid=_number(parts[1], "pid"), used_memory_mb=_number(parts[2], "used_memory")
            )
        )
    return apps


def merge(gpus: list[GpuState], apps: dict[str, list[GpuProcess]]) -> list[GpuState]:
    for gpu in gpus:
        gpu.processes = list(apps.get(gpu.uuid, []))
    return gpus


def is_free(
    gpu: GpuState, policy: GpuPolicy, *, our_pids: Iterable[int] = (), leased: bool = False
) -> bool:
    """Free: under both thresholds, no active lease, and no compute process that is not ours."""
    if leased:
        return False
    ours = set(our_pids)
    if any(p.pid not in ours for p in gpu.processes):
        return False
    return (
        gpu.memory_used_mb <= policy.max_memory_used_mb
        and gpu.utilization_pct <= policy.max_utilization_pct
    )


def _memory(pynvml: Any, handle: Any) -> Any:
    """Memory as nvidia-smi reports it. The v1 call counts the driver's reserved memory as used
    (480 MiB on an idle H100, where nvidia-smi says 0), so an NVML host would read busier than
    an nvidia-smi one; v2 keeps reserved apart. Drivers older than v2 answer with v1."""
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    except (pynvml.NVMLError, AttributeError):
        return pynvml.nvmlDeviceGetMemoryInfo(handle)


def read_nvml() -> list[GpuState]:
    """The local GPUs through NVML; raises InventoryError when there is no driver or GPU."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        raise InventoryError("nvidia-ml-py is not installed") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise InventoryError(f"NVML unavailable: {exc}") from exc
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = _memory(pynvml, handle)
            try:
                util = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                util = 0
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            procs = [
                GpuProcess(pid=int(p.pid), used_memory_mb=int((p.usedGpuMemory or 0) // 2**20))
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            ]
            gpus.append(
                GpuState(
                    index=i,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_mb=int(mem.total // 2**20),
                    memory_used_mb=int(mem.used // 2**20),
                    utilization_pct=util,
                    processes=procs,
                )
            )
        return gpus
    except pynvml.NVMLError as exc:
        raise InventoryError(f"NVML query failed: {exc}") from exc
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def read_nvidia_smi_local(timeout: float = 10.0) -> list[GpuState]:
    """The local GPUs through the nvidia-smi binary (the fallback when NVML fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise InventoryError("no nvidia-smi on PATH")
    try:
        gpus = subprocess.run(
            [exe, *QUERY_GPU_ARGS], capture_output=True, text=True, timeout=timeout, check=True
        ).stdout
        apps = subprocess.run(
            [exe, *QUERY_APPS_ARGS], capture_output=True, text=True, timeout=timeout, check=True
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise InventoryError(
            f"nvidia-smi exited {exc.returncode}: {exc.stderr.strip()[:200]}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise InventoryError(f"nvidia-smi did not answer within {timeout:g}s") from exc
    return merge(parse_query_gpu(gpus), parse_query_apps(apps))
