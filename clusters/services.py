"""Writes about machines: the local host, inventory snapshots, Slurm detection."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from clusters import gpus as gpu_lib
from clusters import localuser, signals, slurm_pacing
from clusters.choices import GpuSource, HostKind, HostState
from clusters.executors import (
    LocalTransport,
    ProtocolError,
    SlurmExecutor,
    SshTransport,
    TransportError,
)
from clusters.models import Gpu, Host

log = logging.getLogger(__name__)

LOCAL_HOST_NAME = "local"
SLURM_HOST_NAME = "slurm"


RUN_USER_ROOT = "~/.labsite/runs"


def local_run_root() -> str:
    """Where local runs keep their directories: the run user's home when there is one (it
    cannot enter the server's data directory), else the data directory itself."""
    return RUN_USER_ROOT if localuser.run_user() is not None else str(settings.DATA_DIR / "runs")


def host_ensure_local() -> Host:
    """The machine Labsite runs on, registered once as the host `local`."""
    host, created = Host.objects.get_or_create(
        name=LOCAL_HOST_NAME,
        defaults={
            "kind": HostKind.LOCAL,
            "hostname": "localhost",
            "port": 0,
            "enabled": bool(settings.LABSITE["LOCAL_HOST_ENABLED"]),
            "run_root": local_run_root(),
        },
    )
    if created:
        log.info("registered the local host (enabled=%s)", host.enabled)
    return host


def host_set_run_root(*, host: Host, run_root: str) -> Host:
    """Point the host at another run root (its runs' directories live there)."""
    Host.objects.filter(pk=host.pk).update(run_root=run_root)
    host.run_root = run_root
    return host


def inventory_store(
    *,
    host: Host,
    gpus: list[gpu_lib.GpuState],
    source: str,
    note: str = "",
    pid_runs: dict[int, str] | None = None,
) -> list[Gpu]:
    """Upsert the host's GPUs by UUID; GPUs it no longer reports are kept but marked absent.

    A poll writes this every few seconds per host, so only what changed is written: a GPU
    row is rewritten (and its updated_at moved) when its reported state differs, and the
    host's inventory_at says when the whole inventory was last read. An idle host costs two
    small queries per poll. A GPU seen for the first time by two writers at once (the local
    poll and the inventory timer) is created by one; the other retries.
    """
    try:
        return _inventory_store(host, gpus, source, note, pid_runs or {})
    except IntegrityError:
        return _inventory_store(host, gpus, source, note, pid_runs or {})


def _inventory_store(
    host: Host,
    gpus: list[gpu_lib.GpuState],
    source: str,
    note: str,
    pid_runs: dict[int, str],
) -> list[Gpu]:
    now = timezone.now()
    values = {
        state.uuid: {
            "host_id": host.id,
            "index": state.index,
            "name": state.name,
            "memory_total_mb": state.memory_total_mb,
            "memory_used_mb": state.memory_used_mb,
            "utilization_pct": state.utilization_pct,
            "processes": [
                {"pid": p.pid, "used_memory_mb": p.used_memory_mb, "run_id": pid_runs.get(p.pid)}
                for p in state.processes
            ],
            "present": True,
        }
        for state in gpus
    }
    with transaction.atomic():
        known = {g.uuid: g for g in Gpu.objects.select_for_update().filter(uuid__in=values)}
        rows, changed, new = [], [], []
        for uuid, reported in values.items():
            gpu = known.get(uuid)
            if gpu is None:
                gpu = Gpu(uuid=uuid, updated_at=now, **reported)
                new.append(gpu)
            elif any(getattr(gpu, name) != value for name, value in reported.items()):
                for name, value in reported.items():
                    setattr(gpu, name, value)
                gpu.updated_at = now
                changed.append(gpu)
            rows.append(gpu)
        if changed:
            fields = [*next(iter(values.values())), "updated_at"]  # every report sets these
            Gpu.objects.bulk_update(changed, fields)
        if new:
            Gpu.objects.bulk_create(new)
        Gpu.objects.filter(host=host, present=True).exclude(uuid__in=values).update(
            present=False, updated_at=now
        )
        facts = {
            "gpu_source": source,
            "state": HostState.ONLINE,
            "state_note": note,
            "last_seen_at": now,
            "inventory_at": now,
        }
        Host.objects.filter(pk=host.pk).update(**facts)
    for name, value in facts.items():
        setattr(host, name, value)
    return rows


def local_pid_runs(states: list[gpu_lib.GpuState]) -> dict[int, str]:
    """Which GPU processes on this machine belong to Labsite runs (their LABSITE_RUN_ID)."""
    found = {}
    for state in states:
        for proc in state.processes:
            try:
                with open(f"/proc/{proc.pid}/environ", "rb") as f:
                    for item in f.read().split(b"\0"):
                        if item.startswith(b"LABSITE_RUN_ID="):
                            found[proc.pid] = item[15:].decode(errors="replace")
            except OSError:
                continue
    return found


def inventory_from_report(host: Host, report: Any) -> None:
    """Store what a host's poll said of its machine: its CPUs and memory, and what nvidia-smi
    said (no or broken nvidia-smi is a CPU host)."""
    host_store_machine(host, cpus=report.cpus, memory_mb=report.memory_mb)
    if report.error:
        inventory_store(host=host, gpus=[], source=GpuSource.NONE, note=f"CPU host: {report.error}")
        return
    try:
        states = gpu_lib.merge(
            gpu_lib.parse_query_gpu(report.query_gpu), gpu_lib.parse_query_apps(report.query_apps)
        )
    except gpu_lib.InventoryError as exc:
        inventory_store(host=host, gpus=[], source=GpuSource.NONE, note=f"CPU host: {exc}")
        return
    note = "" if states else "CPU host: nvidia-smi lists no GPU"
    inventory_store(
        host=host, gpus=states, source=GpuSource.NVIDIA_SMI, note=note, pid_runs=report.pid_runs
    )


def host_store_machine(host: Host, *, cpus: int | None, memory_mb: int | None) -> None:
    """Record the host's core count and memory where they changed (one UPDATE then, else
    none): what its CPU slots default to (Host.cpu_slots_effective)."""
    cpus = cpus if cpus is not None else host.cpu_count
    memory_mb = memory_mb if memory_mb is not None else host.memory_mb
    if (cpus, memory_mb) == (host.cpu_count, host.memory_mb):
        return
    Host.objects.filter(pk=host.pk).update(cpu_count=cpus, memory_mb=memory_mb)
    host.cpu_count, host.memory_mb = cpus, memory_mb


def local_machine() -> tuple[int, int | None]:
    """This machine's CPUs (those the server may run on) and memory in MB."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        memory_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (ValueError, OSError):
        return cpus, None
    return cpus, int(memory_mb)


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
    cpus, memory_mb = local_machine()
    host_store_machine(host, cpus=cpus, memory_mb=memory_mb)
    inventory_store(
        host=host, gpus=states, source=source, note=note, pid_runs=local_pid_runs(states)
    )
    return host


def host_check_run_user_reach(host: Host) -> None:
    """Record on the local host which of the server's services its run user can reach without
    a password (localuser.local_refusal reads it). Checked as that user, by connecting: what
    the machine's Redis and PostgreSQL allow is theirs to decide, not ours to assume. A check
    that could not run leaves the last answer (or none: members then wait for the next)."""
    from clusters.executors import Executor, LocalTransport, ProtocolError, TransportError

    user = localuser.run_user()
    if user is None:
        return
    try:
        reaches = Executor(LocalTransport(user)).reach(localuser.reach_targets())
    except (TransportError, ProtocolError) as exc:
        log.warning("could not check what %s can reach: %s", user.name, exc)
        return
    if host.facts.get(localuser.REACHES) == reaches:
        return
    if reaches:
        log.warning("the run user %s can reach %s without a password", user.name, reaches)
    host.facts = {**host.facts, localuser.REACHES: reaches}
    Host.objects.filter(pk=host.pk).update(facts=host.facts)


def slurm_detect() -> Host | None:
    """Ask this machine's `sinfo` (as the run user, whose commands submit the runs); when it
    answers, keep the cluster as the host `slurm`, with its partitions, nodes, GRES, MaxTime,
    version and accounting (clusters.slurm.detection_facts), and the client configuration
    this server's Slurm commands use (SLURM_CONF), which its runs' use too. A host named
    `slurm` that is not this machine's (an admin's login node over SSH) is left alone."""
    if shutil.which("sinfo") is None:
        return None
    existing = Host.objects.filter(name=SLURM_HOST_NAME).first()
    if existing is not None and not is_local_slurm(existing):
        log.info("host %s is not this machine's Slurm: local detection leaves it", existing.name)
        return None
    conf = os.environ.get("SLURM_CONF", "")
    try:
        facts = _slurm_executor(conf=conf).detect()
    except (TransportError, ProtocolError) as exc:
        log.info("sinfo did not answer: %s", exc)
        return None
    now = timezone.now()
    host, _ = Host.objects.update_or_create(
        name=SLURM_HOST_NAME,
        defaults={
            "kind": HostKind.SLURM,
            "hostname": "localhost",
            "port": 22,
            "state": HostState.ONLINE,
            "state_note": "",
            "gpu_source": GpuSource.SLURM,
            "facts": {**facts, "slurm_conf": conf},
            "last_seen_at": now,
            "inventory_at": now,
        },
    )
    return host


def is_local_slurm(host: Host) -> bool:
    """A Slurm host whose login node is this machine (its commands run here, as the run user)."""
    return host.kind == HostKind.SLURM and host.hostname in ("", "localhost")


def _slurm_executor(*, conf: str, host: Host | None = None) -> SlurmExecutor:
    timeout = float(settings.LABSITE["SINFO_TIMEOUT_SECONDS"])
    if host is None or is_local_slurm(host):
        transport: LocalTransport | SshTransport = LocalTransport(localuser.run_user())
    else:
        transport = SshTransport.for_host(host)
    return SlurmExecutor(transport, conf=conf, timeout=timeout)


def _slurm_redetect(host: Host, now: Any) -> tuple[Host, str]:
    """A Slurm host's probe: detect its cluster again through its login node (this machine, or
    over SSH once its key is pinned); a login node whose Slurm does not answer is offline,
    with Slurm's words."""
    conf = str((host.facts or {}).get("slurm_conf") or "")
    executor = _slurm_executor(conf=conf, host=host)
    try:
        facts = executor.detect()
    except (TransportError, ProtocolError) as exc:
        Host.objects.filter(pk=host.pk).exclude(state=HostState.KEY_MISMATCH).update(
            state=HostState.OFFLINE, state_note=f"Slurm did not answer: {exc}"[:500]
        )
        host.refresh_from_db()
        return host, host.state
    finally:
        slurm_pacing.record_calls(host.pk, executor.calls)
    Host.objects.filter(pk=host.pk).exclude(state=HostState.KEY_MISMATCH).update(
        state=HostState.ONLINE,
        state_note="",
        gpu_source=GpuSource.SLURM,
        facts={**facts, "slurm_conf": conf},
        last_seen_at=now,
        inventory_at=now,
    )
    host.refresh_from_db()
    return host, host.state


def gpu_policy_for(host: Host) -> gpu_lib.GpuPolicy:
    """The host's thresholds, falling back to the lab defaults."""
    return gpu_policy(host.gpu_free_max_mem_mb, host.gpu_free_max_util_pct)


def gpu_policy(max_mem_mb: int | None, max_util_pct: int | None) -> gpu_lib.GpuPolicy:
    """A host's overrides (None: not overridden) over the lab defaults."""
    lab = settings.LABSITE
    return gpu_lib.GpuPolicy(
        max_memory_used_mb=max_mem_mb
        if max_mem_mb is not None
        else int(lab["GPU_FREE_MAX_MEM_MB"]),
        max_utilization_pct=max_util_pct
        if max_util_pct is not None
        else int(lab["GPU_FREE_MAX_UTIL_PCT"]),
    )


# --- hosts: registration, probes, pinned keys --------------------------------------------

KEY_DIR_NAME = "keys"


def store_private_key(*, host_name: str, key_text: str) -> str:
    """Keep an uploaded private key (0600) in the data dir; returns its path. Never shown again."""
    from io import StringIO

    import paramiko

    key_text = key_text.strip() + "\n"
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            key_class.from_private_key(StringIO(key_text))
            break
        except (paramiko.SSHException, ValueError):
            continue
    else:
        raise ValidationError({"private_key": "not an unencrypted OpenSSH/PEM private key"})
    directory = settings.DATA_DIR / KEY_DIR_NAME
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{host_name}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key_text)
    return str(path)


def host_probe(host_id: int) -> tuple[Host, str]:
    """Connect once; pin the key on first contact, refuse a changed one. Returns (host, outcome).

    outcome: online | offline | key_mismatch. Runs in a worker or the CLI, never in a request.
    """
    host = Host.objects.get(pk=host_id)
    now = timezone.now()
    try:
        return _probe(host, now)
    finally:
        Host.objects.filter(pk=host.pk).update(probed_at=timezone.now())


def _probe(host: Host, now: Any) -> tuple[Host, str]:
    from clusters import executors

    if host.kind == HostKind.LOCAL:
        Host.objects.filter(pk=host.pk).update(
            state=HostState.ONLINE, last_seen_at=now, state_note=""
        )
        host.refresh_from_db()
        return host, HostState.ONLINE
    if is_local_slurm(host):
        return _slurm_redetect(host, now)
    target = executors.SshTransport.for_host(host).target
    try:
        seen = executors.probe(target)
    except executors.HostKeyMismatch as exc:
        host_refuse_key(host=host, expected=exc.expected, presented=exc.got, note=str(exc))
        host.refresh_from_db()
        return host, HostState.KEY_MISMATCH
    except Exception as exc:  # noqa: BLE001 - any failure to connect means offline, with why
        Host.objects.filter(pk=host.pk).exclude(state=HostState.KEY_MISMATCH).update(
            state=HostState.OFFLINE, state_note=f"{type(exc).__name__}: {exc}"[:500]
        )
        host.refresh_from_db()
        return host, HostState.OFFLINE
    # Pin on first contact only: a conditional update, so a concurrent probe cannot re-pin.
    Host.objects.filter(pk=host.pk, host_key_fingerprint="").update(host_key_fingerprint=seen)
    Host.objects.filter(pk=host.pk, host_key_fingerprint=seen).update(
        state=HostState.ONLINE, state_note="", last_seen_at=now
    )
    host.refresh_from_db()
    if host.kind == HostKind.SLURM and host.state == HostState.ONLINE:
        return _slurm_redetect(host, now)
    return host, host.state


def host_refuse_key(*, host: Host, expected: str, presented: str, note: str) -> bool:
    """The host presented another key than the pinned one: nothing is sent to it until an admin
    accepts the new key. True (and host_key_changed sent, once) when this marked it."""
    changed = (
        Host.objects.filter(pk=host.pk)
        .exclude(state=HostState.KEY_MISMATCH)
        .update(
            state=HostState.KEY_MISMATCH,
            state_note=note[:500],
            facts={**host.facts, "presented_fingerprint": presented},
        )
    )
    if changed:
        signals.host_key_changed.send(
            sender=Host, host=host, expected=expected, presented=presented
        )
    return bool(changed)


def host_mark_unreachable(*, host: Host, error: str) -> None:
    """A transport error: the host is offline (a refused key stays what it is)."""
    Host.objects.filter(pk=host.pk).exclude(state=HostState.KEY_MISMATCH).update(
        state=HostState.OFFLINE, state_note=error[:500]
    )


def host_mark_seen(*, host: Host) -> None:
    """The host answered (a poll of a host without a GPU inventory of its own to store)."""
    Host.objects.filter(pk=host.pk).update(state=HostState.ONLINE, last_seen_at=timezone.now())


def host_accept_key(*, host: Host, fingerprint: str) -> Host:
    """An admin accepts the key a host now presents (after checking it out of band)."""
    presented = host.facts.get("presented_fingerprint")
    if host.state != HostState.KEY_MISMATCH or not presented:
        raise ValidationError({"fingerprint": f"host {host.name} has no changed key to accept"})
    if fingerprint != presented:
        raise ValidationError(
            {"fingerprint": f"the host presented {presented}, not {fingerprint}; check it again"}
        )
    facts = {k: v for k, v in host.facts.items() if k != "presented_fingerprint"}
    Host.objects.filter(pk=host.pk, state=HostState.KEY_MISMATCH).update(
        host_key_fingerprint=fingerprint, state=HostState.UNKNOWN, state_note="", facts=facts
    )
    host.refresh_from_db()
    return host
