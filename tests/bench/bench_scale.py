"""Benchmark: a lab at scale. 1,000 active runs on 16 namespace hosts (4 fake GPUs each, and CPU
runs beside them), placed by the real scheduler and launched over SSH:

- one poll cycle of every host, shared out over 2 processes as the worker's pool (at its
  default size) does, and in threads of one process: its wall time and the SSH round trips
  per host;
- the scheduler's full pass with them all active and 100 GPU runs waiting;
- the footprint of `manage.py serve` (web, worker, beat, watcher, at their default process
  counts) while it keeps those runs polled: PSS per process and in all (smaps_rollup), and
  the database connections it holds (pg_stat_activity);
- nothing lost or launched twice: every run still running, each started once (the runs write
  their id to a file on their host as they start).

`make bench` (BENCH=scale); writes bench-results/scale.md. BENCH_SCALE_HOSTS and
BENCH_SCALE_RUNS make it smaller.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "labsite.settings")
django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402

from clusters.executors import SshTransport  # noqa: E402
from clusters.models import Host  # noqa: E402
from clusters.services import host_ensure_local, host_probe  # noqa: E402
from experiments import runner, scheduler, services  # noqa: E402
from experiments.actors import Actor  # noqa: E402
from experiments.models import Run  # noqa: E402
from labsite.models import ApiToken  # noqa: E402
from labsite.roles import assign_role  # noqa: E402
from tests.harness import fakegpu  # noqa: E402
from tests.harness.ports import free_port, wait_port  # noqa: E402
from tests.harness.sshhosts import SshLab  # noqa: E402
from tests.harness.worker import redis_test_client, stop_process_group  # noqa: E402

N_HOSTS = int(os.environ.get("BENCH_SCALE_HOSTS", "16"))
N_ACTIVE = int(os.environ.get("BENCH_SCALE_RUNS", "1000"))
GPUS_PER_HOST = 4
N_WAITING = 100
SERVE_SECONDS = float(os.environ.get("BENCH_SCALE_SERVE_SECONDS", "45"))
COMMAND = 'echo "$LABSITE_RUN_ID" >> ~/starts; sleep 3600'


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def place_and_launch(actor: Actor, gpu_runs: int, cpu_runs: int) -> list[str]:
    """The runs created as a user would, placed by the scheduler's pass and launched by the
    dispatch the worker would run (here in this process, one after another)."""
    ids = [
        services.run_create(
            actor=actor, command=COMMAND, name=f"gpu-{i}", gpus=1, auto_start=True, kick=False
        ).id
        for i in range(gpu_runs)
    ]
    scheduler.schedule_pass(full=True)  # the GPU runs first: each needs a CPU slot beside
    ids += [
        services.run_create(
            actor=actor, command=COMMAND, name=f"cpu-{i}", auto_start=True, kick=False
        ).id
        for i in range(cpu_runs)
    ]
    scheduler.schedule_pass(full=True)
    placed = list(Run.objects.filter(pk__in=ids, status="launching").values_list("id", flat=True))
    assert len(placed) == len(ids), f"{len(placed)} of {len(ids)} placed"
    for run_id in placed:
        runner.run_dispatch(run_id)
    for host in Host.objects.filter(kind="ssh"):
        runner.host_sync(host.pk)  # each run seen running
    running = Run.objects.filter(pk__in=ids, status="running").count()
    assert running == len(ids), f"{running} of {len(ids)} running"
    return ids


def _poll_in_thread(host_id: int) -> None:
    try:
        runner.host_sync(host_id)
    finally:
        connection.close()


@contextlib.contextmanager
def counted_trips() -> Iterator[Counter]:
    """SSH round trips, by host, while it lasts."""
    calls: Counter = Counter()
    original = SshTransport.run

    def counted(self, *a, **k):  # type: ignore[no-untyped-def]
        calls[self.target.hostname] += 1
        return original(self, *a, **k)

    SshTransport.run = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        SshTransport.run = original  # type: ignore[method-assign]


def poll_cycles(hosts: list[Host], n: int = 5) -> dict[str, float]:
    walls = []
    with counted_trips() as calls:
        for _ in range(n):
            began = time.perf_counter()
            threads = [threading.Thread(target=_poll_in_thread, args=(h.pk,)) for h in hosts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            walls.append((time.perf_counter() - began) * 1000)
    return {
        "wall_p50": statistics.median(walls),
        "wall_max": max(walls),
        "trips_per_host": max(calls.values()) / n,
    }


def _poller(host_ids: list[int], pipe: Any) -> None:
    """A process like one of the worker's pool: polls its share of the hosts (in threads, as
    each arrives) whenever the bench says go, and answers with its SSH round trips."""
    with counted_trips() as calls:
        while pipe.recv():
            calls.clear()
            threads = [threading.Thread(target=_poll_in_thread, args=(h,)) for h in host_ids]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            pipe.send(dict(calls))


def poll_cycles_in(processes: int, hosts: list[Host], n: int = 5) -> dict[str, float]:
    """One poll of every host, shared out over `processes` processes (the worker's pool at
    its default size): wall time from go to the last answer, and round trips per host."""
    context = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    ids = [h.pk for h in hosts]
    for k in range(processes):
        ours, theirs = context.Pipe()
        proc = context.Process(target=_poller, args=(ids[k::processes], theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    walls, trips = [], []
    try:
        for cycle in range(n + 1):
            began = time.perf_counter()
            for pipe in pipes:
                pipe.send(True)
            answers: Counter = Counter()
            for pipe in pipes:
                answers.update(pipe.recv())
            if cycle:  # the first one opens each process's SSH connections
                walls.append((time.perf_counter() - began) * 1000)
                trips.append(max(answers.values()))
    finally:
        for pipe in pipes:
            pipe.send(False)
        for proc in procs:
            proc.join(30)
    return {
        "wall_p50": statistics.median(walls),
        "wall_max": max(walls),
        "trips_per_host": max(trips),
    }


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def what(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    for name, key in (
        ("gunicorn", "gunicorn"),
        ("celery beat", " beat"),
        ("celery worker", " worker"),
        ("watcher", "watch_hosts"),
        ("serve", " serve"),
    ):
        if key in text:
            return name
    return text[:40]


def footprint(port: int, token: str) -> dict[str, object]:
    """`manage.py serve` at its defaults for SERVE_SECONDS, keeping the runs polled, and its
    site read the while as an agent would (the runs list, one run, system health), so that
    what the web processes dirty counts too."""
    import urllib.request

    env = dict(os.environ)
    env.pop("WEB_CONCURRENCY", None)
    env.pop("WORKER_CONCURRENCY", None)
    log = open(ROOT / "bench-results" / "scale-serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_port(port, timeout=60)
        deadline = time.monotonic() + SERVE_SECONDS
        one = Run.objects.values_list("id", flat=True).first()
        paths = ["/api/runs?limit=100", f"/api/runs/{one}", "/api/wild/v2/system-health"]
        reads = 0
        while time.monotonic() < deadline:
            for path in paths:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}{path}", headers={"X-Auth-Token": token}
                )
                with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
                    assert answer.status == 200, (path, answer.status)
                reads += 1
            time.sleep(0.05)
        pids = [p for p in descendants(proc.pid) if Path(f"/proc/{p}").exists()]
        rows = Counter()
        counts = Counter()
        for p in pids:
            rows[what(p)] += pss_kb(p)
            counts[what(p)] += 1
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
            db_connections = cursor.fetchone()[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_process_group(proc)
        log.close()
    return {"rows": rows, "counts": counts, "db": db_connections, "reads": reads}


def started_once(lab: SshLab, ids: list[str]) -> tuple[int, int]:
    """(runs started exactly once, starts of runs started more than once)."""
    starts: Counter[str] = Counter()
    for h in lab:
        path = Path(h.home) / "starts"
        if path.exists():
            starts.update(path.read_text().split())
    once = sum(1 for run_id in ids if starts[run_id] == 1)
    twice = sum(n for run_id, n in starts.items() if n > 1)
    return once, twice


def main() -> None:
    assert connection.vendor == "postgresql", "the benchmark runs on PostgreSQL"
    logging.getLogger("experiments").setLevel(logging.WARNING)
    redis_test_client().flushdb()
    user, _ = get_user_model().objects.get_or_create(username="bench-scale")
    assign_role(user, "member")
    _, token = ApiToken.issue(user)
    actor = Actor(kind="user", user=user)
    gpu_runs = min(N_ACTIVE, N_HOSTS * GPUS_PER_HOST)
    slots = -(-(N_ACTIVE - gpu_runs) // N_HOSTS) + GPUS_PER_HOST + 8
    (ROOT / "bench-results").mkdir(exist_ok=True)
    began = time.monotonic()
    with SshLab(n_hosts=N_HOSTS) as lab:
        for i, h in enumerate(lab, start=1):
            fakegpu.install(h, fakegpu.gpu_rows(GPUS_PER_HOST, i))
            host = Host.objects.create(
                name=h.name,
                kind="ssh",
                hostname=h.ip,
                port=h.port,
                username=h.username,
                identity_file=str(h.key_path),
                # The namespace hosts share this machine's 2 cores; as lab machines they
                # would have their own.
                cpu_slots=slots,
            )
            assert host_probe(host.pk)[1] == "online"
            runner.host_sync(host.pk)  # its GPUs
        host_ensure_local()
        Host.objects.filter(name="local").update(enabled=False)
        hosts = list(Host.objects.filter(kind="ssh").order_by("name"))
        ids = place_and_launch(actor, gpu_runs, N_ACTIVE - gpu_runs)
        setup_s = time.monotonic() - began
        for i in range(N_WAITING):  # GPU runs that wait: every GPU is taken
            services.run_create(
                actor=actor, command="true", name=f"wait-{i}", gpus=1, auto_start=True, kick=False
            )
        cycle = poll_cycles(hosts)
        connection.close()
        pooled = poll_cycles_in(2, hosts)
        passes = []
        for _ in range(5):
            t0 = time.perf_counter()
            scheduler.schedule_pass(full=True)
            passes.append((time.perf_counter() - t0) * 1000)
        connection.close()
        redis_test_client().flushdb()  # the dispatches the passes sent: nobody consumes them
        foot = footprint(free_port(), token)
        still = Run.objects.filter(pk__in=ids, status="running").count()
        once, twice = started_once(lab, ids)
        waiting = Run.objects.filter(name__startswith="wait-", status="queued").count()
    rows: Counter = foot["rows"]  # type: ignore[assignment]
    counts: Counter = foot["counts"]  # type: ignore[assignment]
    total_mb = sum(rows.values()) / 1024
    lines = [
        f"# A lab at scale (measured {time.strftime('%Y-%m-%d %H:%M')} UTC, 2-core machine)",
        "",
        f"{len(ids)} active runs on {N_HOSTS} namespace hosts ({GPUS_PER_HOST} fake GPUs each: "
        f"{gpu_runs} GPU runs, {len(ids) - gpu_runs} CPU runs), placed by the scheduler and "
        f"launched over SSH (set up in {setup_s:.0f} s); {waiting} GPU runs waiting.",
        "",
        "| figure | value | target |",
        "|---|---:|---:|",
        f"| one poll cycle of all hosts over 2 processes (the worker's pool), p50 / max | "
        f"{pooled['wall_p50']:.0f} / {pooled['wall_max']:.0f} ms | <= 500 ms |",
        f"| the same in threads of one process, p50 / max | {cycle['wall_p50']:.0f} / "
        f"{cycle['wall_max']:.0f} ms | |",
        f"| SSH round trips per host per cycle | {pooled['trips_per_host']:.1f} | 1 |",
        f"| scheduler full pass, p50 / max | {statistics.median(passes):.0f} / "
        f"{max(passes):.0f} ms | <= 200 ms |",
        f"| runs still running after serve polled them {SERVE_SECONDS:.0f} s | {still} of "
        f"{len(ids)} | all |",
        f"| runs started exactly once / extra starts | {once} / {twice} | all / 0 |",
        "",
        f"`manage.py serve` at its defaults, after {SERVE_SECONDS:.0f} s keeping them polled "
        f"and answering {foot['reads']} agent reads (runs list, one run, system health):",
        "",
        "| process | count | PSS MB |",
        "|---|---:|---:|",
        *(
            f"| {name} | {counts[name]} | {kb / 1024:.0f} |"
            for name, kb in sorted(rows.items(), key=lambda kv: -kv[1])
        ),
        f"| **total** | {sum(counts.values())} | **{total_mb:.0f}** (target <= 400) |",
        "",
        f"Database connections held: {foot['db']}.",
    ]
    table = "\n".join(lines)
    print(table)
    (ROOT / "bench-results" / "scale.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
