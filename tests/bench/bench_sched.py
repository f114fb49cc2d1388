"""Benchmark: one scheduler pass with 10,000 queued runs and 64 GPUs (8 hosts x 8).

Time and SQL queries of the full pass (the timer's) that fills every GPU and of the one that finds
none free, and of the quick pass (a kick) that follows one run's end. `make bench` runs it on a
scratch PostgreSQL database; writes bench-results/sched.md.
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
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django.utils import timezone  # noqa: E402

from clusters.models import Gpu, Host  # noqa: E402
from experiments import scheduler  # noqa: E402
from experiments.models import GpuLease, Run  # noqa: E402
from tests.harness.worker import redis_test_client  # noqa: E402

N_QUEUED = int(os.environ.get("BENCH_QUEUED", "10000"))


def seed() -> None:
    user, _ = get_user_model().objects.get_or_create(username="bench-sched")
    now = timezone.now()
    for h in range(8):
        host = Host.objects.create(
            name=f"sched-{h}",
            kind="ssh",
            hostname=f"10.9.9.{h}",
            state="online",
            gpu_source="nvidia-smi",
        )
        Gpu.objects.bulk_create(
            Gpu(
                host=host,
                uuid=f"GPU-sched-{h}-{i}",
                index=i,
                memory_total_mb=81920,
                memory_used_mb=4,
                updated_at=now,
            )
            for i in range(8)
        )
    Run.objects.bulk_create(
        (
            Run(
                name=f"q-{i}",
                command="python train.py",
                status="queued",
                gpus=1 + (i % 4 == 0),
                gpuwrap_config={"enabled": True, "retries": -1},
                created_by=user,
                queued_at=now,
            )
            for i in range(N_QUEUED)
        ),
        batch_size=2000,
    )
    connection.cursor().execute("ANALYZE")


def timed_pass(full: bool = True) -> tuple[float, int, dict[str, int]]:
    with CaptureQueriesContext(connection) as ctx:
        t0 = time.perf_counter()
        result = scheduler.schedule_pass(full=full)
        elapsed = time.perf_counter() - t0
    return elapsed * 1000, len(ctx.captured_queries), result


def one_run_ends() -> None:
    """What a run's end leaves behind: its lease released, one GPU free."""
    lease = GpuLease.objects.filter(released_at__isnull=True).order_by("id").first()
    assert lease is not None
    Run.objects.filter(pk=lease.run_id).update(status="finished")
    GpuLease.objects.filter(pk=lease.pk).update(released_at=timezone.now())


def main() -> None:
    assert connection.vendor == "postgresql"
    redis_test_client().flushdb()
    seed()
    fill_ms, fill_q, fill = timed_pass()
    steady = [timed_pass() for _ in range(5)]
    quick_idle = [timed_pass(full=False) for _ in range(5)]
    quick = []
    for _ in range(20):
        one_run_ends()
        quick.append(timed_pass(full=False))
    assert all(q[2]["placed"] == 1 for q in quick), quick
    # Free the GPUs again and measure a pass that places one wave into a warmed-up queue.
    GpuLease.objects.update(released_at=timezone.now())
    Run.objects.filter(status="launching").update(status="finished")
    refill_ms, refill_q, refill = timed_pass()
    redis_test_client().flushdb()  # the dispatch messages of placed runs go nowhere
    lines = [
        f"# One scheduler pass, {N_QUEUED} queued runs (1 or 2 GPUs each), 64 GPUs on 8 hosts",
        f"(measured {time.strftime('%Y-%m-%d %H:%M')} UTC on PostgreSQL, 2-core machine)",
        "",
        "| pass | wall ms | SQL queries | placed | ms per placed run |",
        "|---|---:|---:|---:|---:|",
        f"| fills every GPU | {fill_ms:.0f} | {fill_q} | {fill['placed']} | {fill_ms / max(1, fill['placed']):.1f} |",
        f"| refill after a wave ends | {refill_ms:.0f} | {refill_q} | {refill['placed']} | {refill_ms / max(1, refill['placed']):.1f} |",
        f"| steady state, nothing free (median of 5) | {statistics.median(s[0] for s in steady):.0f} | "
        f"{steady[-1][1]} | 0 | - |",
        f"| quick pass (a kick), nothing free (median of 5) | "
        f"{statistics.median(q[0] for q in quick_idle):.1f} | {quick_idle[-1][1]} | 0 | - |",
        f"| quick pass (a kick) after one run ends (median of 20) | "
        f"{statistics.median(q[0] for q in quick):.1f} | {quick[-1][1]} | 1 | "
        f"{statistics.median(q[0] for q in quick):.1f} |",
    ]
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "sched.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
