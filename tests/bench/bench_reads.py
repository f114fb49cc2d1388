"""Benchmark: the reads agents repeat in their monitoring loops, Labsite beside research-agent.

The same workload against both, in one run: `GET /runs` (100 rows), `GET /runs/{id}` and
`GET /wild/v2/system-health`, one new connection per request (as the agents' `curl` makes),
first Labsite alone with nothing polled (the idle column), then
the two servers asked in turn, request by request, so that what else the machine is doing
weighs on both alike. At 1,000 and at 100,000 runs (BENCH_READ_SIZES), Labsite on PostgreSQL
and on SQLite, served as `manage.py serve` serves it (its gunicorn command line), with 100 of
its runs active and polled meanwhile: a process writes what the poller writes for them
(experiments.runner.output.copy_outputs: log bytes, metric lines) every second.

research-agent (../shared/peers/research-agent, unmodified, in memory) runs in a venv of its
own under the bench's data dir. Its runs are made through its API: 1,000 with `POST /runs`,
the rest with `POST /sweeps` of 1,000 runs each (it rewrites its whole state file on every
POST: 100,000 single POSTs would take hours). Without that folder,
or where its requirements cannot be installed, the table has research-agent's reference
figures from its README instead, and says so. Prints the table with the ratios
(research-agent p50 / Labsite p50: above 1, Labsite is faster); writes bench-results/reads.md.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
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

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from tests.bench.timing import one_request, pct  # noqa: E402
from tests.harness.ports import free_port, wait_port  # noqa: E402

SIZES = [int(n) for n in os.environ.get("BENCH_READ_SIZES", "1000,100000").split(",")]
N_ACTIVE = 100
N_REQUESTS = int(os.environ.get("BENCH_REQUESTS", "300"))
WARM_UP = 30
PEER = ROOT.parent / "shared" / "peers" / "research-agent"
# research-agent's README, measured on these machines on 2026-12-01 (ms, p50).
REFERENCE = {"runs": 6.0, "run": 2.0, "health": 1.0}
READS = [
    ("runs", "GET /runs (100 rows)", "/api/runs?limit=100", "/runs?limit=100"),
    ("run", "GET /runs/{id}", "/api/runs/{id}", "/runs/{id}"),
    (
        "health",
        "GET /wild/v2/system-health",
        "/api/wild/v2/system-health",
        "/wild/v2/system-health",
    ),
]


def side_by_side(
    ours: tuple[int, str, dict[str, str]], theirs: tuple[int, str] | None
) -> tuple[list[float], list[float]]:
    """Latencies (ms) of one read on both servers, asked in turn."""
    mine: list[float] = []
    peer: list[float] = []
    for i in range(N_REQUESTS + WARM_UP):
        a = one_request(*ours)
        b = one_request(theirs[0], theirs[1], {}) if theirs else 0.0
        if i >= WARM_UP:
            mine.append(a)
            peer.append(b)
    return mine, peer


def request(port: int, method: str, path: str, body: dict | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    text = response.read()
    conn.close()
    assert response.status < 300, (path, response.status, text[:200])
    return json.loads(text)


def stop_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- Labsite (in a child process per database and size: --case) ---------------------------


def seed_labsite(n_runs: int) -> tuple[str, str]:
    """n_runs runs (a tenth of them in 100 sweeps), N_ACTIVE running on 4 hosts with a GPU
    lease each; a token. Returns (token, an active run's id)."""
    from django.contrib.auth import get_user_model

    from clusters.models import Gpu, Host
    from experiments.models import GpuLease, Run, Sweep
    from labsite.models import ApiToken
    from labsite.roles import assign_role

    user, _ = get_user_model().objects.get_or_create(username="bench-reads")
    assign_role(user, "member")
    _, token = ApiToken.issue(user)
    now = timezone.now()
    hosts = [
        Host.objects.create(name=f"reads-{i}", kind="ssh", hostname=f"10.9.0.{i}", cpu_count=64)
        for i in range(4)
    ]
    gpus = [
        Gpu.objects.create(uuid=f"GPU-reads-{h.id}-{i}", host=h, index=i, updated_at=now)
        for h in hosts
        for i in range(N_ACTIVE // 4)
    ]
    sweeps = [Sweep.objects.create(name=f"s{i}", created_by=user) for i in range(100)]
    done = ["finished", "failed", "stopped", "queued", "ready"]
    batch: list[Run] = []
    active: list[Run] = []
    for i in range(n_runs):
        run = Run(
            name=f"reads-{i}",
            command=f"python train.py --lr=0.001 --seed={i}",
            status="running" if i < N_ACTIVE else done[i % len(done)],
            created_by=user,
            host=hosts[i % 4],
            sweep=sweeps[i % 100] if i % 10 == 0 else None,
            gpus=1,
            params={"seed": i, "lr": 0.001},
            metrics_latest={"loss": {"step": 100, "value": 0.5}},
        )
        batch.append(run)
        if run.status == "running":
            active.append(run)
        if len(batch) == 5000:
            Run.objects.bulk_create(batch)
            batch = []
    Run.objects.bulk_create(batch)
    # auto_now_add wrote now; the runs' ages make the newest page a mix of states.
    with connection.cursor() as cur:
        if connection.vendor == "postgresql":
            cur.execute(
                "UPDATE experiments_run SET created_at = %s - (random() * interval '30 days')",
                [now],
            )
            cur.execute("ANALYZE")
        else:
            # As Django writes an aware time to SQLite: its UTC wall time, with microseconds.
            cur.execute(
                "UPDATE experiments_run SET created_at = strftime('%Y-%m-%d %H:%M:%S', 'now', "
                "'-' || (abs(random()) % 2592000) || ' seconds') || '.' || "
                "printf('%06d', abs(random()) % 1000000)"
            )
            cur.execute("ANALYZE")
    GpuLease.objects.bulk_create(GpuLease(gpu=g, run=r) for g, r in zip(gpus, active, strict=True))
    return token, active[0].id


def poll_writer() -> None:
    """What the poller writes for the active runs, once a second, until killed: each run's new
    log bytes and two metric lines, through the poller's own copy_outputs."""
    from clusters.executors import RunReport
    from experiments.models import Run
    from experiments.runner.output import copy_outputs

    step = 0
    while True:
        started = time.monotonic()
        step += 1
        runs = list(Run.objects.filter(status="running"))
        pairs = []
        for run in runs:
            chunk = f"step {step} loss {1 / step:.4f}\n".encode()
            lines = [
                json.dumps({"step": step, "loss": 1 / step}),
                json.dumps({"step": step, "lr": 0.001}),
            ]
            pairs.append(
                (
                    run,
                    RunReport(
                        state="running",
                        pid=1000,
                        log_size=run.log_size + len(chunk),
                        log_offset=run.log_size,
                        log_chunk=chunk,
                        metrics_offset=run.metrics_offset + sum(len(x) + 1 for x in lines),
                        metrics_lines=lines,
                    ),
                )
            )
        copy_outputs(pairs)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def labsite_case(n_runs: int, peer_port: int | None, out: Path) -> None:
    """Seed, serve, poll and measure one (database, size); the samples go to `out` (JSON)."""
    from labsite.management.commands.serve import _commands

    token, run_id = seed_labsite(n_runs)
    connection.close()
    port = free_port()
    env = dict(os.environ)
    server = subprocess.Popen(
        _commands("127.0.0.1", port)["web"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    writer = None
    try:
        wait_port(port, 60)
        # Idle first (nothing polled), Labsite alone: what the poller's writes cost the reads.
        idle = {}
        for key, _, ours, _ in READS:
            mine, _ = side_by_side((port, ours.format(id=run_id), {"X-Auth-Token": token}), None)
            idle[key] = mine
        writer = subprocess.Popen(
            [sys.executable, __file__, "--poll"], cwd=ROOT, env=env, start_new_session=True
        )
        time.sleep(3)  # the writer's first passes
        assert writer.poll() is None, "the poll writer ended"
        samples: dict[str, object] = {"idle": idle}
        for key, _, ours, theirs in READS:
            samples[key] = side_by_side(
                (port, ours.format(id=run_id), {"X-Auth-Token": token}),
                (peer_port, theirs.format(id=PEER_RUN)) if peer_port else None,
            )
        assert writer.poll() is None, "the poll writer ended"
    finally:
        if writer is not None:
            stop_group(writer)
        stop_group(server)
    out.write_text(json.dumps(samples))


def postgres_url() -> str:
    """The bench's database, over PostgreSQL's Unix socket where it answers there (what a lab
    with its database on the server's machine configures; README): a round trip on the socket
    is about a third shorter than on 127.0.0.1. TCP otherwise."""
    import psycopg

    url = os.environ["DATABASE_URL"]
    sockets = Path("/var/run/postgresql")
    db = settings.DATABASES["default"]
    if not sockets.is_dir():
        return url
    try:
        psycopg.connect(
            host=str(sockets),
            port=db["PORT"] or 5432,
            user=db["USER"],
            password=db["PASSWORD"],
            dbname=db["NAME"],
            connect_timeout=5,
        ).close()
    except psycopg.Error:
        return url
    host = f"{db['HOST']}:{db['PORT']}" if db["PORT"] else db["HOST"]
    return url.replace(f"@{host}/", f"@%2Fvar%2Frun%2Fpostgresql:{db['PORT'] or 5432}/", 1)


def run_case(vendor: str, n_runs: int, peer_port: int | None, base: Path) -> dict:
    """One case in a child process, on a database of its own."""
    env = dict(os.environ)
    if vendor == "sqlite":
        db = base / f"reads-{n_runs}.sqlite3"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        env["DATABASE_URL"] = f"sqlite:///{db}"
    else:
        env["DATABASE_URL"] = postgres_url()
        reset = subprocess.run(
            [sys.executable, "manage.py", "flush", "--noinput"], cwd=ROOT, env=env, check=False
        )
        assert reset.returncode == 0, "flush failed"
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True
    )
    out = base / f"reads-{vendor}-{n_runs}.json"
    args = [sys.executable, __file__, "--case", str(n_runs), str(peer_port or 0), str(out)]
    subprocess.run(args, cwd=ROOT, env=env, check=True)
    return json.loads(out.read_text())


# --- research-agent -------------------------------------------------------------------------

PEER_RUN = ""  # the id of a run of research-agent's, read by the "one run" case


def peer_python(base: Path) -> Path | None:
    """research-agent's venv (made once per data dir), or None where it cannot be had."""
    venv = base / "ra-venv"
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.exists():
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "-r",
                str(PEER / "server" / "requirements.txt"),
            ],
            check=True,
            timeout=900,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"research-agent: its requirements could not be installed ({exc})")
        return None
    marker.write_text("ok\n")
    return python


class Peer:
    """research-agent, started on a work dir of its own; `start(n)` leaves it holding n runs."""

    def __init__(self, python: Path, base: Path) -> None:
        self.python, self.base = python, base
        self.work, self.tmux = base / "ra-work", base / "ra-tmux"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def _launch(self) -> None:
        self.port = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("TMUX", "RESEARCH_AGENT_USER_AUTH_TOKEN", "RESEARCH_AGENT_KEY")
        }
        env.update(
            TMUX_TMPDIR=str(self.tmux), RESEARCH_AGENT_TMUX_SESSION=f"bench-ra-{os.getpid()}"
        )
        log = (self.base / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(self.python),
                "server.py",
                "--workdir",
                str(self.work),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=PEER / "server",
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_port(self.port, 120)

    def start(self, n_runs: int) -> str:
        """research-agent holding n_runs runs; returns one run's id."""
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.tmux.mkdir(exist_ok=True)
        self._launch()
        made = min(n_runs, 1000)
        ids = [
            request(
                self.port,
                "POST",
                "/runs",
                {"name": f"r{i}", "command": f"python train.py --seed={i}"},
            )["id"]
            for i in range(made)
        ]
        # The rest as sweeps of 1,000 runs each (`ready`, not started), through its API too:
        # it rewrites its whole state file on every POST, and reads it back only into a dict
        # its routes do not use (server.py's load_runs_state), so it cannot be restarted on a
        # file written for it.
        for start in range(made, n_runs, 1000):
            size = min(1000, n_runs - start)
            sweep = request(
                self.port,
                "POST",
                "/sweeps",
                {
                    "name": f"s{start}",
                    "base_command": "python train.py",
                    "parameters": {"seed": list(range(start, start + size))},
                    "max_runs": size,
                },
            )
            assert len(sweep["run_ids"]) == size, sweep.get("progress")
        return ids[0]

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None
        socket_path = self.tmux / f"tmux-{os.getuid()}" / "default"
        if socket_path.exists():
            subprocess.run(["tmux", "-S", str(socket_path), "kill-server"], check=False)


def make_peer(base: Path) -> Peer | None:
    if not (PEER / "server" / "server.py").exists():
        print(f"research-agent: {PEER} is not here")
        return None
    if shutil.which("tmux") is None:
        print("research-agent: tmux is missing (scripts/bench.sh installs it)")
        return None
    python = peer_python(base)
    return Peer(python, base) if python else None


def main() -> None:
    assert connection.vendor == "postgresql", "the benchmark runs beside PostgreSQL"
    base = Path(settings.DATA_DIR) / "research-agent"
    base.mkdir(parents=True, exist_ok=True)
    peer = make_peer(base)
    source = "measured in this run" if peer else "its README's reference figures (not run here)"
    lines = [
        f"# Agent reads: Labsite beside research-agent ({source}); {N_ACTIVE} runs active and "
        f"polled; one new connection per request, the two servers in turn; "
        f"{timezone.now():%Y-%m-%d %H:%M} UTC",
        "",
        "| runs | database | read | Labsite idle p50 ms | Labsite p50 ms | Labsite p95 ms "
        "| research-agent p50 ms | ratio (RA / Labsite) |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    worst = float("inf")
    try:
        for n_runs in SIZES:
            peer_run = peer.start(n_runs) if peer else ""
            for vendor in ("postgresql", "sqlite"):
                os.environ["BENCH_PEER_RUN"] = peer_run
                samples = run_case(vendor, n_runs, peer.port if peer else None, base)
                if vendor == "postgresql":
                    vendor = "postgresql (socket)" if "%2F" in postgres_url() else "postgresql"
                for key, label, _, _ in READS:
                    mine, theirs = samples[key]
                    ours50 = statistics.median(mine)
                    peer50 = statistics.median(theirs) if peer else REFERENCE[key]
                    worst = min(worst, peer50 / ours50)
                    idle50 = statistics.median(samples["idle"][key])
                    lines.append(
                        f"| {n_runs:,} | {vendor} | {label} | {idle50:.2f} | {ours50:.2f} | "
                        f"{pct(mine, 95):.2f} | {peer50:.2f} | {peer50 / ours50:.2f} |"
                    )
                print(lines[-1], flush=True)
    finally:
        if peer:
            peer.stop()
    lines += ["", f"Lowest ratio: {worst:.2f} (target: at least 1 on every read)"]
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "reads.md").write_text(table + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--poll"]:
        poll_writer()
    elif sys.argv[1:2] == ["--case"]:
        PEER_RUN = os.environ.get("BENCH_PEER_RUN", "")
        n, peer_port, out_path = int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
        labsite_case(n, peer_port or None, out_path)
    else:
        main()
