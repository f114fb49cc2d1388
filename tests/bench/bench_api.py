"""Benchmark: GET /api/runs?limit=50 with 10,000 runs in PostgreSQL, through gunicorn.

Run by `make bench` (scripts/bench.sh) against a scratch database; prints a table and writes it
to bench-results/. Not a test: nothing fails on a number.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "labsite.settings")
django.setup()

from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django.utils import timezone  # noqa: E402

from clusters.models import Gpu, Host  # noqa: E402
from experiments.models import GpuLease, Run, Sweep  # noqa: E402
from labsite.models import ApiToken  # noqa: E402
from labsite.roles import assign_role  # noqa: E402

N_RUNS = int(os.environ.get("BENCH_RUNS", "10000"))
N_REQUESTS = int(os.environ.get("BENCH_REQUESTS", "200"))


def seed() -> str:
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username="bench")
    assign_role(user, "member")
    _, token = ApiToken.issue(user)
    if Run.objects.count() >= N_RUNS:
        return token
    hosts = [
        Host.objects.get_or_create(name=f"bench-{i}", defaults={"kind": "ssh"})[0] for i in range(4)
    ]
    now = timezone.now()
    gpus = [
        Gpu.objects.get_or_create(
            uuid=f"GPU-bench-{h.id}-{i}", defaults={"host": h, "index": i, "updated_at": now}
        )[0]
        for h in hosts
        for i in range(8)
    ]
    sweep = Sweep.objects.create(name="bench", created_by=user)
    statuses = ["queued", "running", "finished", "failed", "stopped", "ready"]
    batch = [
        Run(
            name=f"bench-{i}",
            command=f"python train.py --seed={i}",
            status=statuses[i % 6],
            created_by=user,
            host=hosts[i % 4],
            sweep=sweep if i % 3 == 0 else None,
            gpus=1,
            params={"seed": i},
        )
        for i in range(N_RUNS)
    ]
    Run.objects.bulk_create(batch, batch_size=2000)
    # Spread creation times so "newest first" is a real ordering.
    with connection.cursor() as cur:
        cur.execute(
            "UPDATE experiments_run SET created_at = %s - (random() * interval '30 days')", [now]
        )
    running = list(Run.objects.filter(status="running").order_by("-created_at")[: len(gpus)])
    GpuLease.objects.bulk_create(
        GpuLease(gpu=g, run=r) for g, r in zip(gpus, running, strict=False)
    )
    connection.cursor().execute("ANALYZE")
    return token


def query_counts(token: str) -> dict[int, int]:
    client = Client(HTTP_X_AUTH_TOKEN=token, HTTP_HOST="localhost")
    counts = {}
    for limit in (10, 50, 200):
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(f"/api/runs?limit={limit}").status_code == 200
        counts[limit] = len(ctx.captured_queries)
    return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_latencies(token: str, path: str) -> list[float]:
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "labsite.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        samples = []
        for i in range(N_REQUESTS + 10):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            start = time.perf_counter()
            conn.request("GET", path, headers={"X-Auth-Token": token})
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - start
            conn.close()
            assert response.status == 200, response.status
            if i >= 10:  # warm-up: connections, caches
                samples.append(elapsed * 1000)
        return samples
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    assert connection.vendor == "postgresql", "the benchmark runs on PostgreSQL"
    started = time.perf_counter()
    token = seed()
    seeded = time.perf_counter() - started
    counts = query_counts(token)
    rows = []
    for label, path in [
        ("GET /api/runs?limit=50", "/api/runs?limit=50"),
        ("GET /api/runs?limit=50&status=running", "/api/runs?limit=50&status=running"),
        ("GET /api/runs?limit=50&offset=5000", "/api/runs?limit=50&offset=5000"),
        ("GET /api/wild/v2/system-health", "/api/wild/v2/system-health"),
    ]:
        samples = http_latencies(token, path)
        rows.append((label, statistics.median(samples), pct(samples, 95), len(samples)))
    lines = [
        f"# API latency, {Run.objects.count()} runs in PostgreSQL, gunicorn 2 workers, loopback",
        f"(seeded in {seeded:.1f} s; measured {timezone.now():%Y-%m-%d %H:%M} UTC)",
        "",
        "| request | p50 ms | p95 ms | n |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {p50:.1f} | {p95:.1f} | {n} |" for label, p50, p95, n in rows],
        "",
        "| page size (limit) | SQL queries per request |",
        "|---:|---:|",
        *[f"| {limit} | {n} |" for limit, n in counts.items()],
    ]
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "api.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
