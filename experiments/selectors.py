"""Reads: the lab's state as the API and pages show it. Never SSH; the database only."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models import Count, F, Max, Min, Prefetch, Q, QuerySet, Sum
from django.db.models.functions import Length, Substr

from clusters.choices import HostKind
from clusters.models import Gpu, Host
from clusters.services import gpu_policy_for
from experiments.choices import ACTIVE, RunStatus
from experiments.models import Alert, GpuLease, Run, RunEvent, Sweep
from experiments.rundir import log_path
from labsite.validation import lab_limit

logger = logging.getLogger(__name__)

GPU_FREE = "free"
GPU_LEASED = "leased"
GPU_FOREIGN = "busy_foreign"
GPU_BUSY = "busy"


def runs_list() -> QuerySet[Run]:
    """Runs newest first, with what a page of them shows, in a fixed number of queries."""
    return Run.objects.select_related("host", "created_by").prefetch_related(
        Prefetch(
            "leases",
            queryset=GpuLease.objects.filter(released_at__isnull=True).select_related("gpu"),
            to_attr="active_leases",
        )
    )


def run_summaries(queryset: QuerySet[Run]) -> QuerySet[Run]:
    """Runs as list rows show them: the head of each command and its length, never all of it
    (commands run to LABSITE_MAX_COMMAND_LENGTH; a page of whole ones would be megabytes)."""
    return queryset.defer("command").annotate(
        command_head=Substr("command", 1, lab_limit("LIST_COMMAND_CHARS")),
        command_length=Length("command"),
    )


def run_status_counts(queryset: QuerySet[Run] | None = None) -> dict[str, int]:
    qs = Run.objects.all() if queryset is None else queryset
    counts = dict(
        qs.order_by().values_list("status").annotate(n=Count("id")).values_list("status", "n")
    )
    return {status: counts.get(status, 0) for status in RunStatus.values}


def gpu_state(gpu: Gpu, *, leased: bool, host: Host) -> str:
    """free, leased (to a Labsite run), busy_foreign (someone else's process), or busy."""
    if leased:
        return GPU_LEASED
    if any(not p.get("run_id") for p in gpu.processes):
        return GPU_FOREIGN
    if gpu.processes:
        return GPU_BUSY  # a Labsite run's process on a GPU it holds no lease on
    policy = gpu_policy_for(host)
    if (
        gpu.memory_used_mb > policy.max_memory_used_mb
        or gpu.utilization_pct > policy.max_utilization_pct
    ):
        return GPU_BUSY
    return GPU_FREE


def cluster_state() -> dict[str, Any]:
    """The lab as the latest inventory knows it: cluster type, hosts, GPUs, totals, runs.

    Each host says how old its inventory is (inventory_age_seconds; None: never read), so a
    client that asked for a detect can tell a fresh answer from an old one.
    """
    from django.utils import timezone

    now = timezone.now()
    hosts = list(
        Host.objects.filter(enabled=True).prefetch_related(
            Prefetch("gpus", queryset=Gpu.objects.filter(present=True).order_by("index"))
        )
    )
    leased_ids = set(
        GpuLease.objects.filter(released_at__isnull=True).values_list("gpu_id", "run_id")
    )
    lease_by_gpu = dict(leased_ids)
    cpus_used = dict(
        Run.objects.filter(status__in=list(ACTIVE), host__enabled=True)
        .order_by()
        .values("host_id")
        .annotate(n=Sum("cpus"))
        .values_list("host_id", "n")
    )
    cpu_slots = cpu_free = 0
    totals: Counter[str] = Counter()
    host_rows = []
    slurm_gpus = 0
    for host in hosts:
        gpu_rows = []
        for gpu in host.gpus.all():
            state = gpu_state(gpu, leased=gpu.id in lease_by_gpu, host=host)
            totals[state] += 1
            gpu_rows.append(
                {
                    "index": gpu.index,
                    "uuid": gpu.uuid,
                    "name": gpu.name,
                    "memory_total_mb": gpu.memory_total_mb,
                    "memory_used_mb": gpu.memory_used_mb,
                    "utilization_pct": gpu.utilization_pct,
                    "processes": gpu.processes,
                    "state": state,
                    "run_id": lease_by_gpu.get(gpu.id),
                    # As of the host's last inventory (a row is rewritten only on change).
                    "updated_at": max(filter(None, [gpu.updated_at, host.inventory_at])),
                }
            )
        if host.kind == HostKind.SLURM:
            # Each node once, though it may sit in several partitions (older facts: by partition).
            slurm_gpus += host.facts.get(
                "gpus", sum(p.get("gpus", 0) for p in host.facts.get("partitions", []))
            )
        slots, used = host.cpu_slots_effective, cpus_used.get(host.id, 0)
        if slots is not None and host.kind != HostKind.SLURM:
            cpu_slots += slots
            cpu_free += max(0, slots - used)
        host_rows.append(
            {
                "name": host.name,
                "kind": host.kind,
                "state": host.state,
                "note": host.state_note,
                "gpu_source": host.gpu_source,
                "last_seen_at": host.last_seen_at,
                "inventory_at": host.inventory_at,
                "inventory_age_seconds": (
                    round((now - host.inventory_at).total_seconds(), 1)
                    if host.inventory_at
                    else None
                ),
                "gpu_count": len(gpu_rows),
                "gpus": gpu_rows,
                "cpu_count": host.cpu_count,
                "cpu_slots": slots,
                "cpus_used": used,
                "memory_mb": host.memory_mb,
                **({"slurm": host.facts} if host.kind == HostKind.SLURM else {}),
            }
        )
    direct_gpus = sum(totals.values())
    if any(h.kind == HostKind.SLURM for h in hosts):
        cluster_type = "slurm"
    elif direct_gpus:
        cluster_type = "local_gpu"
    else:
        cluster_type = "cpu_only"
    counts = run_status_counts()
    return {
        "type": cluster_type,
        "gpu_count": direct_gpus + slurm_gpus,
        "gpus": {
            "total": direct_gpus + slurm_gpus,
            "free": totals[GPU_FREE],
            "leased": totals[GPU_LEASED],
            "busy_foreign": totals[GPU_FOREIGN],
            "busy": totals[GPU_BUSY],
        },
        "hosts": host_rows,
        "runs": counts,
        "cpus": {"slots": cpu_slots, "free": cpu_free},
        "capacity": capacity(
            counts=counts,
            gpu_total=direct_gpus + slurm_gpus,
            gpu_free=totals[GPU_FREE],
            cpu_slots=cpu_slots,
        ),
    }


def capacity(
    *, counts: dict[str, int], gpu_total: int, gpu_free: int, cpu_slots: int
) -> dict[str, Any]:
    """max_new_runs = max(0, min(q, g - r)).

    q: room left in the queue (the lab's MAX_QUEUED_RUNS minus what is queued);
    g: run slots (GPUs, or where there is no GPU the CPU slots of the enabled hosts, the
       figures the scheduler places CPU runs against);
    r: runs already holding or waiting for a slot (launching, running, queued).
    """
    lab = settings.LABSITE
    queued = counts.get(RunStatus.QUEUED, 0)
    active = counts.get(RunStatus.RUNNING, 0) + counts.get(RunStatus.LAUNCHING, 0)
    slots = gpu_total if gpu_total else cpu_slots
    q = lab["MAX_QUEUED_RUNS"] - queued
    return {
        "gpu_total": gpu_total,
        "gpu_free": gpu_free,
        "slots": slots,
        "slot_kind": "gpu" if gpu_total else "cpu",
        "max_new_runs": max(0, min(q, slots - active - queued)),
    }


_health_cache: tuple[float, dict[str, Any]] | None = None
_health_refresh = threading.Lock()  # held by the thread that reads it again


def system_health_recent() -> dict[str, Any]:
    """system_health as this process read it at most LABSITE_HEALTH_CACHE_SECONDS ago (1 s;
    0 reads it every time). Agents call it in their monitoring loops, every few seconds each:
    counts a second old cost them nothing, and a read of the whole lab per call costs the
    server the most of any agent read (45 ms on a 2-core machine at 100,000 runs).

    Past its age, and for as long again, the answer is still given, while a thread of this
    process reads it again: no request waits for the read (it made the 95th percentile 46 ms
    at 100,000 runs). Older than that (nobody asked for a while), it is read there and then."""
    global _health_cache
    ttl = float(settings.LABSITE["HEALTH_CACHE_SECONDS"])
    now = time.monotonic()
    cached = _health_cache
    if cached is not None and ttl > 0:
        age = now - cached[0]
        if age < ttl:
            return cached[1]
        if age < 2 * ttl:
            if _health_refresh.acquire(blocking=False):
                threading.Thread(target=_refresh_health, name="health", daemon=True).start()
            return cached[1]
    value = system_health()
    _health_cache = (now, value)
    return value


def _refresh_health() -> None:
    global _health_cache
    try:
        started = time.monotonic()
        _health_cache = (started, system_health())
    except Exception:
        logger.exception("system health could not be read again")
    finally:
        connections.close_all()  # this thread's own
        _health_refresh.release()


def system_health() -> dict[str, Any]:
    """Counts only: safe to show without a token (no host, command or user data)."""
    state = cluster_state()
    counts = state["runs"]
    return {
        "status": "ok",
        "running": counts[RunStatus.RUNNING] + counts[RunStatus.LAUNCHING],
        "queued": counts[RunStatus.QUEUED],
        "held": counts[RunStatus.HELD],
        "ready": counts[RunStatus.READY],
        "completed": counts[RunStatus.FINISHED],
        "failed": counts[RunStatus.FAILED],
        "stopped": counts[RunStatus.STOPPED],
        "total": sum(counts.values()),
        "cluster_type": state["type"],
        **{k: v for k, v in state["capacity"].items()},
        "gpu_leased": state["gpus"]["leased"],
        "gpu_busy_foreign": state["gpus"]["busy_foreign"],
    }


def session_run_events(
    *, user: Any, session_id: str, after_id: int, see_all: bool
) -> QuerySet[RunEvent]:
    """Finished and failed transitions of the session's runs, after a cursor."""
    qs = RunEvent.objects.filter(
        id__gt=after_id,
        to_status__in=[RunStatus.FINISHED, RunStatus.FAILED],
        run__chat_session_id=session_id,
    )
    if not see_all:
        qs = qs.filter(run__created_by=user)
    return qs.select_related("run").order_by("id")


def session_alerts(*, user: Any, session_id: str, after_id: int, see_all: bool) -> QuerySet[Alert]:
    qs = Alert.objects.filter(id__gt=after_id, run__chat_session_id=session_id)
    if not see_all:
        qs = qs.filter(run__created_by=user)
    return qs.select_related("run").order_by("id")


def sweeps_list() -> QuerySet[Sweep]:
    """Sweeps with their run counts per status, in one query."""
    return Sweep.objects.select_related("created_by").annotate(
        **{f"n_{s}": Count("runs", filter=Q(runs__status=s)) for s in RunStatus.values}
    )


def sweep_counts(sweep: Sweep) -> dict[str, int]:
    if hasattr(sweep, f"n_{RunStatus.READY}"):
        return {s: getattr(sweep, f"n_{s}") for s in RunStatus.values}
    return run_status_counts(sweep.runs.all())


def sweep_status(counts: dict[str, int]) -> str:
    """A sweep's status, derived from its runs: never stored, so never stale."""
    if not sum(counts.values()):
        return "empty"
    for status in (RunStatus.RUNNING, RunStatus.LAUNCHING):
        if counts[status]:
            return "running"
    for status in (RunStatus.QUEUED, RunStatus.HELD, RunStatus.READY):
        if counts[status]:
            return str(status)
    if counts[RunStatus.FAILED]:
        return "failed"
    if counts[RunStatus.FINISHED]:
        return "finished"
    return "stopped"


def service_health() -> dict[str, str]:
    """Whether the database and the broker answer: "ok", or "down" for the failing part.

    What load balancers and compose health checks call without credentials, so it says nothing
    about the lab (why a part is down goes to the log), and a dead Redis costs at most half a
    second: one try, short socket timeouts.
    """
    import logging

    from django.db import connection
    from redis import Redis, RedisError
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    log = logging.getLogger(__name__)
    parts = {"database": "ok", "broker": "ok"}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:  # noqa: BLE001 - any failure means the database is down for us
        log.warning("health: the database does not answer", exc_info=True)
        parts["database"] = "down"
    try:
        broker = Redis.from_url(
            settings.REDIS_URL,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            broker.ping()
        finally:
            broker.close()
    except (RedisError, OSError):
        log.warning("health: the broker does not answer", exc_info=True)
        parts["broker"] = "down"
    ok = all(value == "ok" for value in parts.values())
    return {"status": "ok" if ok else "down", **parts}


def collapse_carriage_returns(text: str) -> str:
    """A tqdm bar rewrites its line with \\r: show each line as it last looked."""
    out = []
    for line in text.split("\n"):
        if "\r" in line:
            parts = [p for p in line.split("\r") if p]
            line = parts[-1] if parts else ""
        out.append(line)
    return "\n".join(out)


def run_log(run: Run, *, offset: int, limit: int) -> dict[str, Any]:
    """A byte window of the server's copy of the run's output (never read from the host)."""
    path = log_path(run.id)
    try:
        total = path.stat().st_size
    except OSError:
        total = 0
    start = offset if offset >= 0 else max(0, total + offset)
    start = min(start, total)
    end = min(total, start + limit)
    data = b""
    if end > start:
        with path.open("rb") as f:
            f.seek(start)
            data = f.read(end - start)
    return {
        "run_id": run.id,
        "content": collapse_carriage_returns(data.decode("utf-8", errors="replace")),
        "offset": start,
        "next_offset": end,
        "total_size": total,
        "has_more_before": start > 0,
        "has_more_after": end < total,
    }


def run_metrics(run: Run, *, max_points: int = 2000) -> dict[str, Any]:
    """Series per key ({step, value}, in the order they were logged) and the latest values.

    A series longer than `max_points` is downsampled in the database, not in Python: its
    points fall into max_points / 2 buckets of equal width in the run's sequence, and each
    bucket gives its lowest and its highest value (at the bucket's first and last step), so a
    spike or a divergence stays visible; the first and the last point are kept exactly. A
    100,000-point series costs two grouped queries, never 100,000 rows in Python."""
    from experiments.models import Metric

    mine = Metric.objects.filter(run=run)
    shape = mine.values("key").annotate(n=Count("id"), lo=Min("seq"), hi=Max("seq")).order_by()
    long = {row["key"]: row for row in shape if row["n"] > max_points}
    series: dict[str, list[dict[str, Any]]] = {}
    short = mine.exclude(key__in=list(long)) if long else mine
    for key, step, value in short.order_by("key", "seq").values_list("key", "step", "value"):
        series.setdefault(key, []).append({"step": step, "value": value})
    for key, row in sorted(long.items()):
        series[key] = _downsampled(mine.filter(key=key), row["lo"], row["hi"], max_points)
    latest = {k: v["value"] for k, v in run.metrics_latest.items()}
    return {"run_id": run.id, "series": dict(sorted(series.items())), "latest": latest}


def _downsampled(points: QuerySet[Any], lo: int, hi: int, max_points: int) -> list[dict[str, Any]]:
    buckets = max(1, max_points // 2 - 1)
    width = (hi - lo) // buckets + 1
    grouped = (
        points.annotate(bucket=(F("seq") - lo) / width)
        .values("bucket")
        .annotate(
            first=Min("step"), last=Max("step"), low=Min("value"), high=Max("value"), at=Min("seq")
        )
        .order_by("bucket")
    )
    ends = {
        seq: (step, value)
        for seq, step, value in points.filter(seq__in=[lo, hi]).values_list("seq", "step", "value")
    }
    out = [{"step": ends[lo][0], "value": ends[lo][1]}]
    for row in grouped:
        out.append({"step": row["first"], "value": row["low"]})
        if row["high"] != row["low"]:
            out.append({"step": row["last"], "value": row["high"]})
    if hi != lo:
        out.append({"step": ends[hi][0], "value": ends[hi][1]})
    return out
