"""Benchmarks of runs on hosts: submit -> started over SSH and locally, and one poll cycle.

`make bench` runs this against a scratch PostgreSQL database, the test Redis db, a real worker
and sshd hosts in network namespaces. Prints a table and writes bench-results/runs.md.

The submit benchmark also says where the time goes, stage by stage, from stamps that exist
anyway: the commit (the moment the kick is handed to the broker, seen in this process), the
worker's log lines for each scheduler pass and each dispatch (epoch stamps), the run's
`launching` event, and the wrapper's own started_at on the host (the namespace hosts share
this machine's clock).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from experiments.choices import TERMINAL  # noqa: E402
from experiments.models import Run, RunEvent  # noqa: E402
from labsite.celery import app  # noqa: E402
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


@dataclass
class Submission:
    """The stamps of one run, submitted and started (epoch seconds)."""

    run_id: str
    request: float  # the POST begins
    commit: float  # the run is committed: its kick goes to the broker (on_commit)
    response: float  # the POST returned
    started: float  # the wrapper's started_at, on the host
    stages: dict[str, float] = field(default_factory=dict)  # stage -> ms

    @property
    def total_ms(self) -> float:
        return (self.started - self.request) * 1000


class _SendStamps:
    """Times of the tasks this process sends (the kick's send is the run's commit)."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, str]] = []
        self._send = app.send_task

    def __enter__(self) -> _SendStamps:
        def stamped(name: str, *a: Any, **k: Any) -> Any:
            self.sent.append((time.time(), name))
            return self._send(name, *a, **k)

        app.send_task = stamped  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        app.send_task = self._send  # type: ignore[method-assign]


def submit_to_start(
    api: APIClient, host: Host, root: Path, *, settle: bool = True
) -> list[Submission]:
    """POST /api/runs, then the launch script's own started_at on the host, one run at a time.

    With `settle`, each run is submitted once the one before has ended and been recorded, so
    that its end (the watcher's wake-up, a poll: a python3 on the host, which on a real lab
    runs on the host's CPUs, here on this machine's two) does not share the machine with the
    next submission. Without, each is submitted as soon as the one before has started."""
    samples = []
    with _SendStamps() as sends:
        for i in range(N_SUBMIT + 5):
            sends.sent.clear()
            t0 = time.time()
            response = api.post(
                "/api/runs",
                {"command": "true", "name": f"lat-{i}", "host": host.name, "auto_start": True},
                format="json",
            )
            t1 = time.time()
            assert response.status_code == 201, response.content
            run_id = response.json()["id"]
            started = root / run_id / "started_at"
            wait_for(lambda p=started: p.exists() and p.read_text().strip(), 30, 0.001)
            commit = next((t for t, name in sends.sent if name.endswith(".schedule")), t1)
            if i >= 5:  # warm-up: connections, caches
                samples.append(Submission(run_id, t0, commit, t1, float(started.read_text())))
            if settle:
                wait_for(
                    lambda r=run_id: Run.objects.filter(pk=r, status__in=TERMINAL).exists(),
                    30,
                    0.005,
                )
    return samples


PASS_LINE = re.compile(r"schedule pass \((\w+)\): placed (\d+) in ([\d.]+) ms.*began ([\d.]+)\)")
DISPATCH_LINE = re.compile(
    r"dispatch of (\S+): pid \S+ on \S+, exec ([\d.]+) ms \(began ([\d.]+), exec began ([\d.]+)\)"
)
# Stage -> what it holds. Each stage ends where the next begins: they add up to the total.
STAGES = [
    ("request -> commit", "HTTP, auth, validation, the INSERTs and the commit"),
    ("commit -> pass begins", "the kick through the broker to a worker process, Redis flags, lock"),
    ("pass begins -> placed", "the quick pass up to the run's `launching` event"),
    ("placed -> pass done", "the placement's commit and the rest of the pass"),
    ("pass done -> dispatch begins", "the hand-off to the dispatch (a broker hop, or inline)"),
    ("dispatch begins -> exec begins", "the dispatch's queries: the run, attempts, leases"),
    ("exec begins -> wrapper started", "one exec: launch.sh, the run directory, the wrapper"),
]
SIDE_STAGES = [
    ("commit -> response sent", "the rest of the request (in parallel with the worker)"),
    ("wrapper started -> exec returned", "the pid's way back (in parallel with the run)"),
]


def breakdown(samples: list[Submission], logs: Path) -> None:
    """Fill each submission's stages from the worker's log lines and the runs' events."""
    text = "".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker-*.log")))
    passes = sorted(
        (float(m.group(4)), float(m.group(4)) + float(m.group(3)) / 1000)
        for m in PASS_LINE.finditer(text)
        if int(m.group(2)) > 0
    )
    dispatches = {
        m.group(1): (float(m.group(3)), float(m.group(4)), float(m.group(2)) / 1000)
        for m in DISPATCH_LINE.finditer(text)
    }
    placed_at = {
        run_id: at.timestamp()
        for run_id, at in RunEvent.objects.filter(
            run_id__in=[s.run_id for s in samples], to_status="launching"
        ).values_list("run_id", "created_at")
    }
    for s in samples:
        placed = placed_at.get(s.run_id)
        # The pass that placed the run: the last one that began before its `launching` event.
        pass_ = next((p for p in reversed(passes) if placed and p[0] <= placed), None)
        dispatch = dispatches.get(s.run_id)
        if placed is None or pass_ is None or dispatch is None:
            continue
        began, ended = pass_
        d_began, exec_began, exec_s = dispatch
        stamps = [s.request, s.commit, began, placed, ended, d_began, exec_began, s.started]
        for (name, _), a, b in zip(STAGES, stamps, stamps[1:], strict=False):
            s.stages[name] = (b - a) * 1000
        s.stages["commit -> response sent"] = (s.response - s.commit) * 1000
        s.stages["wrapper started -> exec returned"] = (exec_began + exec_s - s.started) * 1000


def breakdown_table(columns: dict[str, list[Submission]]) -> list[str]:
    head = " | ".join(f"{name} p50 | {name} p95" for name in columns)
    lines = [
        f"| stage (ms) | {head} | what |",
        "|---|" + "---:|" * (2 * len(columns)) + "---|",
    ]
    for name, what in STAGES + SIDE_STAGES:
        cells = []
        for samples in columns.values():
            values = [s.stages[name] for s in samples if name in s.stages]
            if not values:  # a worker without the stamped log lines
                cells += ["n/a", "n/a"]
                continue
            cells += [f"{statistics.median(values):.1f}", f"{pct(values, 95):.1f}"]
        lines.append(f"| {name} | {' | '.join(cells)} | {what} |")
    totals = []
    for samples in columns.values():
        values = [s.total_ms for s in samples]
        totals += [f"{statistics.median(values):.1f}", f"{pct(values, 95):.1f}"]
    lines.append(f"| **total: request -> wrapper started** | {' | '.join(totals)} | |")
    covered = [
        f"{sum(1 for s in samples if s.stages)} of {len(samples)} {name}"
        for name, samples in columns.items()
    ]
    lines += ["", f"(runs with every stamp found: {', '.join(covered)})"]
    return lines


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
            ssh_root = Path(lab[0].home) / ".labsite" / "runs"
            ssh_runs = submit_to_start(api, hosts[0], ssh_root)
            overlapped = submit_to_start(api, hosts[0], ssh_root, settle=False)
            local = host_ensure_local()
            local_runs = submit_to_start(api, local, local_root(local.run_root))
        finally:
            worker.stop()
        poll = poll_cycle(lab, hosts) if N_POLL_RUNS else None  # BENCH_POLL_RUNS=0: skip it
    breakdown(ssh_runs + local_runs, logs)
    rows = [
        ("over SSH to a namespace host", ssh_runs),
        ("`local` executor (floor)", local_runs),
        ("over SSH, each as soon as the one before started (its end overlaps)", overlapped),
    ]
    lines += [
        "One run after another, each once the one before has ended (the end of each, and the",
        "host's poll that records it, then do not share this machine's 2 cores with the next):",
        "",
        "| submit -> process started (launch script's timestamp) | p50 ms | p95 ms | n |",
        "|---|---:|---:|---:|",
        *(
            f"| {what} | {statistics.median(ms):.0f} | {pct(ms, 95):.0f} | {len(ms)} |"
            for what, ms in ((w, [s.total_ms for s in runs]) for w, runs in rows)
        ),
        "",
    ]
    if poll is not None:
        lines += [
            f"| poll cycle: {poll['runs']} active runs on 4 hosts | value |",
            "|---|---:|",
            f"| SSH round trips per cycle | {poll['round_trips']:.0f} |",
            f"| wall time p50 (4 hosts polled in parallel) | {poll['wall_p50']:.0f} ms |",
            f"| wall time max of 5 | {poll['wall_max']:.0f} ms |",
            "",
        ]
    lines += [
        "Where the time goes, one run submitted after another (stamps: the commit seen in this "
        "process, the worker's pass and dispatch log lines, the run's `launching` event, the "
        "wrapper's started_at):",
        "",
        *breakdown_table({"SSH": ssh_runs, "local": local_runs}),
    ]
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "runs.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
