"""Benchmark: the lab at 100,000 runs in PostgreSQL: every API list and every page.

100,000 runs (10,000 of them in 100 sweeps, some under plans), 64 GPUs on 4 hosts with 64
runs holding them, and 2 million metric points: one run with a 100,000-point series, 19,000
runs with 100 points each. Served as `manage.py serve` serves it (its gunicorn command line),
one new connection per request; p50 and p95 of each API list and page, and its SQL queries
per request, counted at 1,000 runs and again at 100,000 (they must not grow with the data).

Targets (issue 13): runs lists p95 <= 30 ms, the run page of the 100,000-point run <= 100 ms;
its chart data (`/metrics`, downsampled in the database) <= 50 ms (issue 11).

`make bench` (BENCH=api); BENCH_RUNS makes it smaller; writes bench-results/api.md.
"""

from __future__ import annotations

import os
import signal
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
from experiments.models import GpuLease, Plan, Run, Sweep  # noqa: E402
from labsite.models import ApiToken  # noqa: E402
from labsite.roles import assign_role  # noqa: E402
from tests.bench.timing import one_request, pct  # noqa: E402
from tests.harness.ports import free_port, wait_port  # noqa: E402

N_RUNS = int(os.environ.get("BENCH_RUNS", "100000"))
N_SMALL = 1000
N_REQUESTS = int(os.environ.get("BENCH_REQUESTS", "100"))
BIG_SERIES = 100_000
SMALL_SERIES_RUNS, SMALL_SERIES = 19_000, 100
LIST_P95_MS, RUN_PAGE_MS, CHART_MS = 30.0, 100.0, 50.0


class Lab:
    """The seeded lab: its user, token, hosts and what the table's paths name."""

    def __init__(self) -> None:
        from django.contrib.auth import get_user_model

        self.user, _ = get_user_model().objects.get_or_create(username="bench")
        assign_role(self.user, "member")
        _, self.token = ApiToken.issue(self.user)
        now = timezone.now()
        self.hosts = [
            Host.objects.create(name=f"bench-{i}", kind="ssh", hostname=f"10.9.1.{i}")
            for i in range(4)
        ]
        self.gpus = [
            Gpu.objects.create(uuid=f"GPU-bench-{h.id}-{i}", host=h, index=i, updated_at=now)
            for h in self.hosts
            for i in range(16)
        ]
        self.plans = [
            Plan.objects.create(
                title=f"plan {i}", author=self.user, raw_markdown="# Plan\n\nA grid."
            )
            for i in range(10)
        ]
        self.sweeps = [
            Sweep.objects.create(name=f"sweep-{i}", created_by=self.user, plan=self.plans[i % 10])
            for i in range(100)
        ]
        self.made = 0
        self.big: Run | None = None

    def add_runs(self, upto: int) -> None:
        """Runs up to `upto` in all: a tenth in sweeps, the states of a lab's history."""
        states = ["finished", "failed", "stopped", "finished", "ready", "queued"]
        batch = []
        for i in range(self.made, upto):
            in_sweep = i % 10 == 0
            batch.append(
                Run(
                    name=f"bench-{i}",
                    command=f"python train.py --lr=0.001 --seed={i}",
                    status=states[i % len(states)],
                    created_by=self.user,
                    host=self.hosts[i % 4],
                    sweep=self.sweeps[(i // 10) % 100] if in_sweep else None,
                    plan=self.plans[(i // 10) % 10] if in_sweep else None,
                    gpus=1,
                    params={"seed": i, "lr": 0.001},
                    metrics_latest={"loss": {"step": 99, "value": 0.5}},
                )
            )
            if len(batch) == 5000:
                Run.objects.bulk_create(batch)
                batch = []
        Run.objects.bulk_create(batch)
        self.made = upto
        with connection.cursor() as cur:
            cur.execute(
                "UPDATE experiments_run SET created_at = now() - (random() * interval '60 days')"
                " WHERE status <> 'running'"
            )

    def activate(self) -> None:
        """64 runs running, one per GPU; the newest of them holds the 100,000-point series."""
        running = list(Run.objects.order_by("-created_at")[: len(self.gpus)])
        Run.objects.filter(pk__in=[r.pk for r in running]).update(
            status="running", started_at=timezone.now()
        )
        GpuLease.objects.bulk_create(
            GpuLease(gpu=g, run=r) for g, r in zip(self.gpus, running, strict=True)
        )
        self.big = running[0]

    def add_metrics(self) -> None:
        assert self.big is not None
        with connection.cursor() as cur:
            cur.execute(
                "INSERT INTO experiments_metric (run_id, key, step, value, seq) "
                "SELECT %s, 'loss', g, 1.0 / (g + 1), g FROM generate_series(0, %s) g",
                [self.big.id, BIG_SERIES - 1],
            )
            cur.execute(
                "INSERT INTO experiments_metric (run_id, key, step, value, seq) "
                "SELECT r.id, 'loss', g, 1.0 / (g + 1), g FROM "
                "(SELECT id FROM experiments_run WHERE id <> %s ORDER BY id LIMIT %s) r, "
                "generate_series(0, %s) g",
                [self.big.id, SMALL_SERIES_RUNS, SMALL_SERIES - 1],
            )
            cur.execute("ANALYZE")

    def api_paths(self) -> list[tuple[str, str]]:
        assert self.big is not None
        sweep = self.sweeps[0].id
        return [
            ("runs list", "/api/runs?limit=100"),
            ("runs list", "/api/runs?limit=100&status=running"),
            ("runs list", "/api/runs?limit=100&status=finished"),
            ("runs list", f"/api/runs?limit=100&sweep={sweep}"),
            ("runs list", "/api/runs?limit=100&offset=50000"),
            ("run", f"/api/runs/{self.big.id}"),
            ("chart data", f"/api/runs/{self.big.id}/metrics"),
            ("list", "/api/sweeps?limit=100"),
            ("one", f"/api/sweeps/{sweep}"),
            ("list", "/api/plans?limit=100"),
            ("one", f"/api/plans/{self.plans[0].id}"),
            ("list", "/api/alerts?limit=100"),
            ("list", "/api/hosts"),
            ("board", "/api/cluster"),
            ("health", "/api/wild/v2/system-health"),
        ]

    def page_paths(self) -> list[tuple[str, str]]:
        assert self.big is not None
        return [
            ("page", "/"),
            ("run page", f"/runs/{self.big.id}"),
            ("page", "/sweeps"),
            ("page", f"/sweeps/{self.sweeps[0].id}"),
            ("page", "/plans"),
            ("page", f"/plans/{self.plans[0].id}"),
            ("page", "/cluster"),
        ]


def session_cookie(lab: Lab) -> str:
    client = Client()
    client.force_login(lab.user)
    return f"sessionid={client.cookies['sessionid'].value}"


def query_counts(lab: Lab, cookie: str) -> dict[str, int]:
    """SQL queries per request of each path, in this process (the test client)."""
    api = Client(HTTP_X_AUTH_TOKEN=lab.token, HTTP_HOST="localhost")
    pages = Client(HTTP_HOST="localhost", HTTP_COOKIE=cookie)
    counts = {}
    for client, paths in ((api, lab.api_paths()), (pages, lab.page_paths())):
        for _, path in paths:
            client.get(path)  # per-process caches (system health) warm, as in a served lab
            with CaptureQueriesContext(connection) as ctx:
                response = client.get(path)
            assert response.status_code == 200, (path, response.status_code)
            counts[path] = len(ctx.captured_queries)
    return counts


def latencies(port: int, path: str, headers: dict[str, str]) -> list[float]:
    samples = [one_request(port, path, headers) for _ in range(N_REQUESTS + 10)]
    return samples[10:]  # warm-up


def generic(path: str) -> str:
    """The path with the seeded ids taken out, to line the two counts up."""
    parts = path.split("?")[0].split("/")
    return "/".join(p if len(p) != 12 or not p.isalnum() else "{id}" for p in parts) + (
        "?" + path.split("?")[1] if "?" in path else ""
    )


def main() -> None:
    from labsite.management.commands.serve import _commands

    assert connection.vendor == "postgresql", "the benchmark runs on PostgreSQL"
    started = time.perf_counter()
    lab = Lab()
    lab.add_runs(min(N_SMALL, N_RUNS))
    lab.activate()
    lab.add_metrics()
    cookie = session_cookie(lab)
    small = {generic(p): n for p, n in query_counts(lab, cookie).items()}
    lab.add_runs(N_RUNS)
    with connection.cursor() as cur:
        cur.execute("ANALYZE")
    seeded = time.perf_counter() - started
    big = query_counts(lab, cookie)
    connection.close()
    port = free_port()
    server = subprocess.Popen(
        _commands("127.0.0.1", port)["web"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    rows = []
    try:
        wait_port(port, 60)
        for headers, paths in (
            ({"X-Auth-Token": lab.token}, lab.api_paths()),
            ({"Cookie": cookie}, lab.page_paths()),
        ):
            for kind, path in paths:
                samples = latencies(port, path, headers)
                rows.append((kind, path, statistics.median(samples), pct(samples, 95)))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(15)

    def verdict(kind: str, p50: float, p95: float) -> str:
        if kind == "runs list":
            return "yes" if p95 <= LIST_P95_MS else "NO"
        if kind == "run page":
            return "yes" if p50 <= RUN_PAGE_MS else "NO"
        if kind == "chart data":
            return "yes" if p50 <= CHART_MS else "NO"
        return ""

    total = Run.objects.count()
    lines = [
        f"# {total:,} runs in PostgreSQL ({total // 10:,} in sweeps), 64 GPUs, "
        f"{BIG_SERIES + SMALL_SERIES_RUNS * SMALL_SERIES:,} metric points (one series of "
        f"{BIG_SERIES:,}); served as `manage.py serve`; one new connection per request",
        f"(seeded in {seeded:.0f} s; measured {timezone.now():%Y-%m-%d %H:%M} UTC; targets: "
        f"runs lists p95 <= {LIST_P95_MS:g} ms, run page <= {RUN_PAGE_MS:g} ms, "
        f"chart data <= {CHART_MS:g} ms)",
        "",
        f"| what | request | p50 ms | p95 ms | queries at {N_SMALL:,} runs "
        f"| queries at {total:,} | target met |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for kind, path, p50, p95 in rows:
        shown = generic(path)
        lines.append(
            f"| {kind} | `{shown}` | {p50:.1f} | {p95:.1f} | {small.get(shown, '?')} "
            f"| {big[path]} | {verdict(kind, p50, p95)} |"
        )
    grown = [generic(p) for p, n in big.items() if small.get(generic(p)) != n]
    lines += ["", f"Query counts that grew with the data: {', '.join(grown) or 'none'}"]
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "api.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
