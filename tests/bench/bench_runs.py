"""Benchmarks of runs on hosts: submit -> started over SSH and locally, and one poll cycle.

`make bench` runs this against a scratch PostgreSQL database, the test Redis db, a real worker
and sshd hosts in network namespaces. Prints a table and writes bench-results/runs.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "labsite.settings")
django.setup()

from django.db import connection  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from clusters.executors import Executor, LaunchSpec, SshTransport  # noqa: E402
from clusters.models import Host  # noqa: E402
from clusters.services import host_ensure_local, host_probe  # noqa: E402
from experiments import runner  # noqa: E402
from experiments.models import Run  # noqa: E402
from labsite.models import ApiToken  # noqa: E402
from labsite.roles import assign_role  # noqa: E402
from tests.harness.localruns import local_root  # noqa: E402
from tests.harness.sshhosts import SshLab  # noqa: E402
from tests.harness.worker import Worker, redis_test_client, wait_for  # noqa: E402

N_SUBMIT = int(os.environ.get("BENCH_SUBMITS", "200"))
N_POLL_RUNS = int(os.environ.get("BENCH_POLL_RUNS", "500"))


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def client() -> APIClient:
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username="bench-runs")
    assign_role(user, "member")
    _, token = ApiToken.issue(user)
    c = APIClient(HTTP_HOST="localhost")
    c.credentials(HTTP_X_AUTH_TOKEN=token)
    return c


def register(lab_host) -> Host:
    host = Host.objects.create(
        name=lab_host.name,
        kind="ssh",
        hostname=lab_host.ip,
        port=lab_host.port,
        username=lab_host.username,
        identity_file=str(lab_host.key_path),
    )
    host, outcome = host_probe(host.pk)
    assert outcome == "online", host.state_note
    return host


def submit_to_start(api: APIClient, host: Host, root: Path) -> list[float]:
    """POST /api/runs, then the launch script's own started_at on the host, one run at a time."""
    samples = []
    for i in range(N_SUBMIT + 5):
        t0 = time.time()
        response = api.post(
            "/api/runs",
            {"command": "true", "name": f"lat-{i}", "host": host.name, "auto_start": True},
            format="json",
        )
        assert response.status_code == 201, response.content
        started = root / response.json()["id"] / "started_at"
        wait_for(lambda p=started: p.exists() and p.read_text().strip(), 30, 0.001)
        if i >= 5:  # warm-up: connections, caches
            samples.append((float(started.read_text()) - t0) * 1000)
    return samples


def poll_cycle(lab: SshLab, hosts: list[Host]) -> dict[str, float]:
    """N_POLL_RUNS sleeping runs across the hosts; one poll of every host, round trips counted."""
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(username="bench-runs")
    per_host = N_POLL_RUNS // len(hosts)
    for host in hosts:
        ex = Executor(SshTransport.for_host(host))
        rows = []
        for i in range(per_host):
            run = Run(
                name=f"poll-{host.name}-{i}",
                command="sleep 600",
                status="running",
                host=host,
                created_by=user,
            )
            pid = ex.launch(LaunchSpec(run_id=run.id, command=run.command, run_root=host.run_root))
            run.pid = pid
            rows.append(run)
        Run.objects.bulk_create(rows)
    calls = {"n": 0}
    original = SshTransport.run

    def counted(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return original(self, *a, **k)

    SshTransport.run = counted  # type: ignore[method-assign]
    try:
        for host in hosts:  # warm the pooled connections and the server's copies
            runner.host_sync(host.pk)
        calls["n"] = 0
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            threads = [threading.Thread(target=_poll_in_thread, args=(h.pk,)) for h in hosts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            walls.append((time.perf_counter() - t0) * 1000)
        trips = calls["n"] / 5
    finally:
        SshTransport.run = original  # type: ignore[method-assign]
    return {
        "runs": per_host * len(hosts),
        "round_trips": trips,
        "wall_p50": statistics.median(walls),
        "wall_max": max(walls),
    }


def _poll_in_thread(host_id: int) -> None:
    try:
        runner.host_sync(host_id)
    finally:
        connection.close()


def main() -> None:
    assert connection.vendor == "postgresql", "the benchmark runs on PostgreSQL"
    redis_test_client().flushdb()
    api = client()
    lines = [
        f"# Runs on hosts (measured {time.strftime('%Y-%m-%d %H:%M')} UTC, 2-core machine)",
        "",
    ]
    logs = ROOT / "bench-results" / "worker-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*"):
        old.unlink()
    with SshLab(n_hosts=4) as lab:
        worker = Worker(logs, LABSITE_POLL_INTERVAL_SECONDS="5").start()
        try:
            hosts = [register(h) for h in lab]
            ssh_samples = submit_to_start(api, hosts[0], Path(lab[0].home) / ".labsite" / "runs")
            local = host_ensure_local()
            local_samples = submit_to_start(api, local, local_root(local.run_root))
        finally:
            worker.stop()
        poll = poll_cycle(lab, hosts)
    lines += [
        "| submit -> process started (launch script's timestamp) | p50 ms | p95 ms | n |",
        "|---|---:|---:|---:|",
        f"| over SSH to a namespace host | {statistics.median(ssh_samples):.0f} | "
        f"{pct(ssh_samples, 95):.0f} | {len(ssh_samples)} |",
        f"| `local` executor (floor) | {statistics.median(local_samples):.0f} | "
        f"{pct(local_samples, 95):.0f} | {len(local_samples)} |",
        "",
        f"| poll cycle: {poll['runs']} active runs on 4 hosts | value |",
        "|---|---:|",
        f"| SSH round trips per cycle | {poll['round_trips']:.0f} |",
        f"| wall time p50 (4 hosts polled in parallel) | {poll['wall_p50']:.0f} ms |",
        f"| wall time max of 5 | {poll['wall_max']:.0f} ms |",
    ]
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "runs.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
