"""Writes about machines: the local host, inventory snapshots, Slurm detection."""

from __future__ import annotations

import logging
import shutil
import subprocess
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from clusters import gpus as gpu_lib
from clusters.choices import GpuSource, HostKind, HostState
from clusters.models import Gpu, Host

log = logging.getLogger(__name__)

LOCAL_HOST_NAME = "local"
SLURM_HOST_NAME = "slurm"


def host_ensure_local() -> Host:
    """The machine Labsite runs on, registered once as the host `local`."""
    host, created = Host.objects.get_or_create(
        name=LOCAL_HOST_NAME,
        defaults={
            "kind": HostKind.LOCAL,
            "hostname": "localhost",
            "port": 0,
            "enabled": settings.LABSITE["LOCAL_HOST_ENABLED"],
            "run_root": str(settings.DATA_DIR / "runs"),
        },
    )
    if created:
        log.info("registered the local host (enabled=%s)", host.enabled)
    return host


def inventory_store(
    *, host: Host, gpus: list[gpu_lib.GpuState], source: str, note: str = ""
) -> list[Gpu]:
    """Upsert the host's GPUs by UUID; GPUs it no longer reports are kept but marked absent."""
    now = timezone.now()
    with transaction.atomic():
        seen = []
        for state in gpus:
            gpu, _ = Gpu.objects.update_or_create(
                uuid=state.uuid,
                defaults={
                    "host": host,
                    "index": state.index,
                    "name": state.name,
                    "memory_total_mb": state.memory_total_mb,
                    "memory_used_mb": state.memory_used_mb,
                    "utilization_pct": state.utilization_pct,
                    "processes": [
                        {"pid": p.pid, "used_memory_mb": p.used_memory_mb} for p in state.processes
                    ],
                    "present": True,
                    "updated_at": now,
                },
            )
            seen.append(gpu)
        Gpu.objects.filter(host=host).exclude(uuid__in=[g.uuid for g in gpus]).update(
            present=False, updated_at=now
        )
        Host.objects.filter(pk=host.pk).update(
            gpu_source=source,
            state=HostState.ONLINE,
            state_note=note,
            last_seen_at=now,
            inventory_at=now,
        )
    host.refresh_from_db()
    return seen


def inventory_refresh_local() -> Host:
    """Read the server's own GPUs: NVML first, nvidia-smi as fallback, else a CPU host."""
    host = host_ensure_local()
    try:
        states, source, note = gpu_lib.read_nvml(), GpuSource.NVML, ""
    except gpu_lib.InventoryError as nvml_error:
        try:
            states, source = gpu_lib.read_nvidia_smi_local(), GpuSource.NVIDIA_SMI
            note = f"NVML failed ({nvml_error}); read with nvidia-smi"
        except gpu_lib.InventoryError as smi_error:
            states, source = [], GpuSource.NONE
            note = f"CPU host: {nvml_error}; {smi_error}"
    inventory_store(host=host, gpus=states, source=source, note=note)
    return host


def parse_sinfo(text: str) -> dict[str, Any]:
    """Rows of `sinfo -h -o '%P|%D|%G|%T'` (partition, nodes, gres, state) as a summary."""
    partitions: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        name, nodes, gres, state = parts
        default = name.endswith("*")
        name = name.rstrip("*")
        part = partitions.setdefault(
            name, {"name": name, "default": default, "nodes": 0, "gpus": 0, "states": {}}
        )
        count = int(nodes) if nodes.isdigit() else 0
        part["nodes"] += count
        part["states"][state] = part["states"].get(state, 0) + count
        for item in gres.split(","):
            # gres looks like gpu:4, gpu:a100:8 or gpu:a100:8(S:0-1)
            fields = item.split("(")[0].split(":")
            if fields[0] == "gpu" and fields[-1].isdigit():
                part["gpus"] += int(fields[-1]) * count
    return {"partitions": list(partitions.values())}


def slurm_detect() -> Host | None:
    """Ask the local `sinfo`; when it answers, keep the cluster as the host `slurm`."""
    exe = shutil.which("sinfo")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "-h", "-o", "%P|%D|%G|%T"],
            capture_output=True,
            text=True,
            timeout=settings.LABSITE["SINFO_TIMEOUT_SECONDS"],
            check=True,
        ).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        log.info("sinfo did not answer: %s", exc)
        return None
    facts = parse_sinfo(out)
    host, _ = Host.objects.update_or_create(
        name=SLURM_HOST_NAME,
        defaults={
            "kind": HostKind.SLURM,
            "hostname": "localhost",
            "port": 22,
            "state": HostState.ONLINE,
            "gpu_source": GpuSource.SLURM,
            "facts": facts,
            "last_seen_at": timezone.now(),
            "inventory_at": timezone.now(),
        },
    )
    return host


def gpu_policy_for(host: Host) -> gpu_lib.GpuPolicy:
    """The host's thresholds, falling back to the lab defaults."""
    lab = settings.LABSITE
    return gpu_lib.GpuPolicy(
        max_memory_used_mb=host.gpu_free_max_mem_mb
        if host.gpu_free_max_mem_mb is not None
        else lab["GPU_FREE_MAX_MEM_MB"],
        max_utilization_pct=host.gpu_free_max_util_pct
        if host.gpu_free_max_util_pct is not None
        else lab["GPU_FREE_MAX_UTIL_PCT"],
    )
