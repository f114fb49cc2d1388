"""Benchmark: the reads agents repeat in their monitoring loops, Labsite beside research-agent.

The same workload against both, in one run, one new connection per request (as the agents'
`curl` makes): 1,000 runs, then `GET /runs` (100 rows), `GET /runs/{id}` and
`GET /wild/v2/system-health`. Labsite runs through gunicorn on PostgreSQL with 100 of its runs
active (leased, as the poller leaves them); research-agent (../shared/peers/research-agent,
unmodified, in memory) in a venv of its own under the bench's data dir. Without that folder,
or where its requirements cannot be installed, the table has research-agent's reference
figures from its README instead, and says so. Prints the table with the ratios (research-agent
p50 / Labsite p50: above 1, Labsite is faster) and writes bench-results/reads.md.
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

from clusters.models import Gpu, Host  # noqa: E402
from experiments.models import GpuLease, Run  # noqa: E402
from labsite.models import ApiToken  # noqa: E402
from labsite.roles import assign_role  # noqa: E402
from tests.harness.ports import free_port, wait_port  # noqa: E402

N_RUNS = int(os.environ.get("BENCH_READ_RUNS", "1000"))
N_ACTIVE = 100
N_REQUESTS = int(os.environ.get("BENCH_REQUESTS", "300"))
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


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def latencies(port: int, path: str, headers: dict[str, str]) -> list[float]:
    samples = []
    for i in range(N_REQUESTS + 20):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start = time.perf_counter()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        elapsed = time.perf_counter() - start
        conn.close()
        assert response.status == 200, (path, response.status)
        if i >= 20:  # warm-up
            samples.append(elapsed * 1000)
    return samples


def request(port: int, method: str, path: str, body: dict | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    text = response.read()
    conn.close()
    assert response.status < 300, (path, response.status, text[:200])
    return json.loads(text)


# --- Labsite --------------------------------------------------------------------------------


def seed_labsite() -> tuple[str, str]:
    """N_RUNS runs, N_ACTIVE of them running on 4 hosts with a GPU lease each; a token."""
    from django.contrib.auth import get_user_model

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
    done = ["finished", "failed", "stopped", "queued", "ready"]
    runs = [
        Run(
            name=f"reads-{i}",
            command=f"python train.py --lr=0.001 --seed={i}",
            status="running" if i < N_ACTIVE else done[i % len(done)],
            created_by=user,
            host=hosts[i % 4],
            gpus=1,
            params={"seed": i, "lr": 0.001},
            metrics_latest={"loss": 0.5, "step": 100},
        )
        for i in range(N_RUNS)
    ]
    Run.objects.bulk_create(runs, batch_size=2000)
    with connection.cursor() as cur:
        cur.execute(
            "UPDATE experiments_run SET created_at = %s - (random() * interval '30 days')", [now]
        )
    active = [r for r in runs if r.status == "running"]
    GpuLease.objects.bulk_create(GpuLease(gpu=g, run=r) for g, r in zip(gpus, active, strict=True))
    connection.cursor().execute("ANALYZE")
    return token, active[0].id


def measure_labsite() -> dict[str, list[float]]:
    token, run_id = seed_labsite()
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
            "--no-control-socket",
        ],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        wait_port(port, 60)
        headers = {"X-Auth-Token": token}
        return {key: latencies(port, path.format(id=run_id), headers) for key, _, path, _ in READS}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


# --- research-agent -------------------------------------------------------------------------


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


def measure_peer() -> dict[str, list[float]] | None:
    if not (PEER / "server" / "server.py").exists():
        print(f"research-agent: {PEER} is not here")
        return None
    if shutil.which("tmux") is None:
        print("research-agent: tmux is missing (scripts/bench.sh installs it)")
        return None
    base = Path(settings.DATA_DIR) / "research-agent"
    base.mkdir(parents=True, exist_ok=True)
    python = peer_python(base)
    if python is None:
        return None
    work, tmux = base / "ra-work", base / "ra-tmux"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    tmux.mkdir(exist_ok=True)
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TMUX", "RESEARCH_AGENT_USER_AUTH_TOKEN", "RESEARCH_AGENT_KEY")
    }
    env.update(TMUX_TMPDIR=str(tmux), RESEARCH_AGENT_TMUX_SESSION=f"bench-ra-{os.getpid()}")
    log = (base / "server.log").open("wb")
    server = subprocess.Popen(
        [
            str(python),
            "server.py",
            "--workdir",
            str(work),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=PEER / "server",
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_port(port, 120)
        ids = [
            request(
                port, "POST", "/runs", {"name": f"r{i}", "command": f"python train.py --seed={i}"}
            )["id"]
            for i in range(N_RUNS)
        ]
        return {key: latencies(port, path.format(id=ids[0]), {}) for key, _, _, path in READS}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
        socket_path = tmux / f"tmux-{os.getuid()}" / "default"
        if socket_path.exists():
            subprocess.run(["tmux", "-S", str(socket_path), "kill-server"], check=False)


def main() -> None:
    assert connection.vendor == "postgresql", "the benchmark runs on PostgreSQL"
    ours = measure_labsite()
    peer = measure_peer()
    source = "measured in this run" if peer else "its README's reference figures (not run here)"
    lines = [
        f"# Agent reads: Labsite beside research-agent ({source}), {N_RUNS} runs, "
        f"{N_ACTIVE} active; one new connection per request; {timezone.now():%Y-%m-%d %H:%M} UTC",
        "",
        "| read | Labsite p50 ms | Labsite p95 ms | research-agent p50 ms | ratio (RA / Labsite) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label, _, _ in READS:
        mine = statistics.median(ours[key])
        theirs = statistics.median(peer[key]) if peer else REFERENCE[key]
        lines.append(
            f"| {label} | {mine:.2f} | {pct(ours[key], 95):.2f} | {theirs:.2f} | {theirs / mine:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "reads.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
