"""Benchmark: a burst of 1,000 short runs onto 2 hosts x 4 (fake) GPUs, through the real worker.

Total time against the ideal (work / slots), and how long GPUs sat idle between two runs
while others waited. `make bench`; writes bench-results/burst.md.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "labsite.settings")
django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402

from clusters.models import Host  # noqa: E402
from clusters.services import host_ensure_local, host_probe  # noqa: E402
from experiments import jobs, services  # noqa: E402
from experiments.actors import Actor  # noqa: E402
from experiments.models import GpuLease, Run  # noqa: E402
from experiments.rundir import log_path  # noqa: E402
from tests.harness import fakegpu  # noqa: E402
from tests.harness.sshhosts import SshLab  # noqa: E402
from tests.harness.worker import Worker, redis_test_client, wait_for  # noqa: E402

N_RUNS = int(os.environ.get("BENCH_BURST_RUNS", "1000"))
SECONDS = float(os.environ.get("BENCH_BURST_SECONDS", "0.5"))
POLL = "0.5"


def main() -> None:
    assert connection.vendor == "postgresql"
    redis_test_client().flushdb()
    user, _ = get_user_model().objects.get_or_create(username="bench-burst")
    actor = Actor(kind="user", user=user)
    logs = ROOT / "bench-results" / "worker-logs-burst"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*"):
        old.unlink()
    with SshLab(n_hosts=2) as lab:
        for i, h in enumerate(lab, start=1):
            fakegpu.install(h, fakegpu.gpu_rows(4, i))
            host = Host.objects.create(
                name=h.name,
                kind="ssh",
                hostname=h.ip,
                port=h.port,
                username=h.username,
                identity_file=str(h.key_path),
                # Every namespace host shares this machine's cores: let each take 4 one-CPU
                # GPU runs, as a real 4-GPU machine would (its cores would be its own).
                cpu_slots=8,
            )
            assert host_probe(host.pk)[1] == "online"
        # Only the two GPU hosts: the server itself is no host here (it would be polled too).
        host_ensure_local()
        Host.objects.filter(name="local").update(enabled=False)
        # The timers not under study run at their shipped defaults (settings.py), not at the
        # test harness's fast ones: the full pass every 5 s, the reconcile pass every 60 s.
        worker = Worker(
            logs,
            LABSITE_POLL_INTERVAL_SECONDS=POLL,
            LABSITE_SCHEDULE_INTERVAL_SECONDS="5",
            LABSITE_RECONCILE_INTERVAL_SECONDS="60",
        ).start()
        try:
            wait_for(
                lambda: (
                    GpuLease.objects.count() == 0
                    and sum(
                        Host.objects.get(name=h.name).gpus.filter(present=True).count() for h in lab
                    )
                    == 8
                ),
                60,
            )
            cpu_before = cpu_times()
            t0 = time.time()
            ids = [
                services.run_create(
                    actor=actor,
                    # The run records, on the host, when its process started and ended.
                    command=f'echo "start $(date +%s.%N) $CUDA_VISIBLE_DEVICES"; sleep {SECONDS}; '
                    'echo "end $(date +%s.%N)"',
                    name=f"burst-{i}",
                    auto_start=True,
                    kick=False,
                    gpuwrap_config={"enabled": True},
                ).id
                for i in range(N_RUNS)
            ]
            submitted = time.time() - t0
            jobs.kick_scheduler()
            wait_for(
                lambda: (
                    Run.objects.filter(pk__in=ids, status__in=["finished", "failed"]).count()
                    == N_RUNS
                ),
                1800,
                1.0,
            )
            total = time.time() - t0
            cpu_after = cpu_times()
        finally:
            worker.stop()
    failed = Run.objects.filter(pk__in=ids, status="failed").count()
    gaps = []
    by_gpu: dict[int, list[GpuLease]] = defaultdict(list)
    for lease in GpuLease.objects.filter(run_id__in=ids).order_by("created_at"):
        by_gpu[lease.gpu_id].append(lease)
    for leases in by_gpu.values():
        for prev, nxt in zip(leases, leases[1:], strict=False):
            if prev.released_at:
                gaps.append((nxt.created_at - prev.released_at).total_seconds())
    held = [
        (lease.released_at - lease.created_at).total_seconds()
        for leases in by_gpu.values()
        for lease in leases
        if lease.released_at
    ]
    ideal = N_RUNS * SECONDS / 8
    idle, overlaps = process_gaps(ids)
    passes = [
        (m.group(1), int(m.group(2)), float(m.group(3)), float(m.group(4)))
        for path in logs.glob("worker-*.log")
        for m in re.finditer(
            r"schedule pass \((\w+)\): placed (\d+) in ([\d.]+) ms, ([\d.]+) ms CPU",
            path.read_text(),
        )
    ]
    worker_log = "".join(path.read_text() for path in logs.glob("worker-*.log"))
    # Every dispatch that starts a run logs a line; the worker logs each task it receives.
    dispatched = len(re.findall(r"dispatch of \S+: pid", worker_log))
    as_tasks = len(re.findall(r"tasks\.dispatch_run\[\S+\] received", worker_log))
    placed_total = sum(p[1] for p in passes)
    pass_ms = sum(p[2] for p in passes)
    pass_cpu_ms = sum(p[3] for p in passes)
    quick = [p[2] for p in passes if p[0] == "quick"]
    full = [p[2] for p in passes if p[0] == "full"]
    busy = cpu_busy_share(cpu_before, cpu_after)
    lines = [
        f"# Burst: {N_RUNS} runs of `sleep {SECONDS}` onto 2 hosts x 4 GPUs (fake nvidia-smi), "
        f"poll interval {POLL} s, full scheduler pass every 5 s (the default)",
        f"(measured {time.strftime('%Y-%m-%d %H:%M')} UTC, 2-core machine; submit took "
        f"{submitted:.1f} s; {failed} failed)",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| total, first submit to last finish | {total:.1f} s |",
        f"| ideal (work / slots) | {ideal:.1f} s |",
        f"| ratio total / ideal | {total / ideal:.2f} |",
        f"| lease released to the next lease of that GPU (scheduler reaction), median | {statistics.median(gaps) * 1000:.0f} ms |",
        f"| same, p95 | {pct(gaps, 0.95) * 1000:.0f} ms |",
        f"| lease held per run (run + launch + detection), median | {statistics.median(held) * 1000:.0f} ms |",
        f"| GPU idle on the host, one run's process end to the next one's start on that GPU, "
        f"median | {statistics.median(idle) * 1000:.0f} ms |",
        f"| same, p95 | {pct(idle, 0.95) * 1000:.0f} ms |",
        f"| runs that overlapped another on a GPU | {overlaps} |",
        f"| scheduling overhead per run (time in scheduler passes / runs placed) | "
        f"{pass_ms / max(1, placed_total):.1f} ms ({len(passes)} passes, {placed_total} placed) |",
        f"| same, CPU time of the worker in those passes / runs placed | "
        f"{pass_cpu_ms / max(1, placed_total):.1f} ms |",
        f"| machine CPU busy during the burst (server and both hosts share its cores) | "
        f"{busy:.0%} |",
        f"| runs started by a dispatch; dispatch tasks received (the rest were started by the "
        f"scheduler task itself) | {dispatched}; {as_tasks} |",
        f"| quick passes (kicks): count, median | {len(quick)}, "
        f"{statistics.median(quick or [0]):.1f} ms |",
        f"| full passes (timer): count, median | {len(full)}, "
        f"{statistics.median(full or [0]):.1f} ms |",
    ]
    table = "\n".join(lines)
    print(table)
    (ROOT / "bench-results" / "burst.md").write_text(table + "\n")


def cpu_times() -> list[int]:
    """The machine's CPU time counters (/proc/stat, first line)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def cpu_busy_share(before: list[int], after: list[int]) -> float:
    delta = [b - a for a, b in zip(before, after, strict=True)]
    idle = delta[3] + delta[4]  # idle + iowait
    return 1 - idle / max(1, sum(delta))


def pct(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def process_gaps(ids: list[str]) -> tuple[list[float], int]:
    """Per GPU, from one run's process end to the next run's start, read from the runs' logs.

    This is the idle time a GPU really sees: end detection (the poll), the scheduler pass and
    the launch, all of it. A negative gap would be two runs on one GPU at once.
    """
    spans: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for run in Run.objects.filter(pk__in=ids).select_related("host"):
        text = log_path(run.id).read_text()
        start = re.search(r"^start ([\d.]+) ([\d,]+)$", text, re.M)
        end = re.search(r"^end ([\d.]+)$", text, re.M)
        assert start and end, f"run {run.id} did not record its start and end: {text!r}"
        for index in start.group(2).split(","):
            spans[(run.host.name, index)].append((float(start.group(1)), float(end.group(1))))
    gaps, overlaps = [], 0
    for runs in spans.values():
        runs.sort()
        for (_, prev_end), (next_start, _) in zip(runs, runs[1:], strict=False):
            overlaps += next_start < prev_end
            gaps.append(next_start - prev_end)
    return gaps, overlaps


if __name__ == "__main__":
    main()
