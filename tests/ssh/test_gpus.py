"""GPU inventory, leases and scheduling on SSH hosts whose nvidia-smi is a fake the test drives.

Real sshd hosts (network namespaces), a real Celery worker with beat (poll every 0.5 s,
scheduler every 1 s), PostgreSQL and Redis; only nvidia-smi is fake
(tests/harness/fakegpu.py).  What a run saw is read back from files its command wrote on the
host, never from Labsite's own account of it.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusters.models import Gpu
from experiments.models import Alert, GpuLease, Run, RunEvent
from tests.harness import fakegpu
from tests.harness.api import TERMINAL, create, register

GPUWRAP = {"enabled": True}
FAST_RETRY = {"enabled": True, "retries": -1, "retry_delay_seconds": 1}

# Appends `<run_id> <hostname> <CUDA_VISIBLE_DEVICES> <start epoch> <CUDA_DEVICE_ORDER>` when it
# starts and `<run_id> end <epoch>` when it ends, to a log in the host's $HOME.
LOGGED = (
    'echo "$LABSITE_RUN_ID $(hostname) ${{CUDA_VISIBLE_DEVICES:-none}} $(date +%s.%N) '
    '${{CUDA_DEVICE_ORDER:-none}}" >> ~/{log}; '
    "sleep {seconds}; "
    'echo "$LABSITE_RUN_ID end $(date +%s.%N)" >> ~/{log}'
)

OOM_TRACE = r"""Traceback (most recent call last):
  File "/home/alice/proj/train.py", line 212, in <module>
    loss.backward()
  File "/home/alice/.venv/lib/python3.11/site-packages/torch/_tensor.py", line 522, in backward
    torch.autograd.backward(
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; 75.31 GiB already allocated; 1.20 GiB free; 77.02 GiB reserved in total by PyTorch) If reserved memory is >> allocated memory try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF
"""
BUSY_TRACE = r"""Traceback (most recent call last):
  File "/home/alice/proj/train.py", line 40, in <module>
    model = model.to("cuda")
RuntimeError: CUDA error: all CUDA-capable devices are busy or unavailable
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1.
"""


# --- helpers -----------------------------------------------------------------------------


def eventually(
    predicate: Callable[[], Any],
    timeout: float,
    describe: Callable[[], str],
    interval: float = 0.2,
) -> Any:
    """wait_for with the state we waited on in the failure message."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {describe()}")
        time.sleep(interval)


def runs_summary(ids: list[str]) -> str:
    rows = Run.objects.filter(pk__in=ids).values_list("status", "reason", "waiting_reason")
    return str(Counter(rows).most_common(8))


def ended(run_id: str, timeout: float = 60) -> Run:
    def done() -> Run | None:
        run = Run.objects.get(pk=run_id)
        return run if run.status in TERMINAL else None

    def why() -> str:
        run = Run.objects.get(pk=run_id)
        events = list(run.events.values_list("from_status", "to_status", "reason", "message"))
        return f"{run_id} is {run.status} ({run.reason!r}, {run.waiting_reason!r}); {events}"

    return eventually(done, timeout, why, 0.2)


def all_ended(ids: list[str], timeout: float) -> None:
    eventually(
        lambda: Run.objects.filter(pk__in=ids, status__in=TERMINAL).count() == len(ids),
        timeout,
        lambda: runs_summary(ids),
        0.5,
    )


def cluster(client) -> dict:
    response = client.get("/api/cluster")
    assert response.status_code == 200, response.content
    return response.json()


def cluster_when(client, predicate: Callable[[dict], bool], timeout: float = 30) -> dict:
    seen: dict = {}

    def check() -> dict | None:
        nonlocal seen
        seen = cluster(client)
        return seen if predicate(seen) else None

    return eventually(check, timeout, lambda: json.dumps(seen, default=str)[:4000], 0.25)


def host_row(state: dict, name: str) -> dict:
    [row] = [h for h in state["hosts"] if h["name"] == name]
    return row


def gpu_row(state: dict, host_name: str, index: int) -> dict:
    [row] = [g for g in host_row(state, host_name)["gpus"] if g["index"] == index]
    return row


def totals_are(**want: int) -> Callable[[dict], bool]:
    return lambda state: all(state["gpus"].get(k) == v for k, v in want.items())


def read_gpu_log(host, name: str = "gpu-log") -> tuple[dict[str, list], dict[str, list]]:
    """{run_id: [(hostname, [indices], start, device_order)]}, {run_id: [end]} from a host."""
    starts: dict[str, list] = defaultdict(list)
    ends: dict[str, list] = defaultdict(list)
    path = Path(host.home) / name
    if not path.exists():
        return starts, ends
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "end":
            ends[parts[0]].append(float(parts[2]))
        else:
            assert len(parts) == 5, f"unexpected line in {host.name}:~/{name}: {line!r}"
            run_id, hostname, cvd, start, order = parts
            indices = [] if cvd == "none" else [int(x) for x in cvd.split(",")]
            starts[run_id].append((hostname, indices, float(start), order))
    return starts, ends


def merged_logs(hosts, name: str = "gpu-log") -> tuple[dict[str, list], dict[str, list]]:
    starts: dict[str, list] = defaultdict(list)
    ends: dict[str, list] = defaultdict(list)
    for h in hosts:
        s, e = read_gpu_log(h, name)
        for k, v in s.items():
            starts[k] += v
        for k, v in e.items():
            ends[k] += v
    return starts, ends


def check_once_and_exclusive(
    ids: list[str], starts: dict[str, list], ends: dict[str, list]
) -> dict[tuple[str, int], list[tuple[float, float, str]]]:
    """Each run started and ended once; no two runs shared a (host, GPU) at the same time."""
    assert sorted(starts) == sorted(ids), "every run started, and only these"
    assert {k: len(v) for k, v in starts.items() if len(v) != 1} == {}, "each run started once"
    assert {k: len(v) for k, v in ends.items() if len(v) != 1} == {}, "each run ended once"
    by_gpu: dict[tuple[str, int], list[tuple[float, float, str]]] = defaultdict(list)
    for run_id in ids:
        [(hostname, indices, start, _)] = starts[run_id]
        [end] = ends[run_id]
        assert indices, f"{run_id} ran without CUDA_VISIBLE_DEVICES"
        assert indices == sorted(indices) and len(set(indices)) == len(indices), indices
        for index in indices:
            by_gpu[(hostname, index)].append((start, end, run_id))
    for gpu, spans in by_gpu.items():
        spans.sort()
        for (s1, e1, r1), (s2, e2, r2) in zip(spans, spans[1:], strict=False):
            assert e1 <= s2, f"{r1} [{s1}, {e1}] and {r2} [{s2}, {e2}] overlap on {gpu}"
    return by_gpu


def foreign_app(host, gpu: dict, used: int = 40960) -> dict:
    """A real process on the host that is not Labsite's, listed on `gpu`."""
    return {"uuid": gpu["uuid"], "pid": fakegpu.start_foreign_process(host), "used": used}


def our_pid(host, name: str, timeout: float = 30) -> int:
    """The pid a run's command wrote to ~/<name> (its own process: it carries LABSITE_RUN_ID)."""
    path = Path(host.home) / name
    text = eventually(
        lambda: path.exists() and path.read_text().strip(), timeout, lambda: f"no {path}"
    )
    return int(text)


# --- a) the main scenario ----------------------------------------------------------------


def test_forty_runs_share_eight_gpus_on_two_hosts_without_overlap(
    fresh_lab, celery_worker, admin, member
):
    """GIVEN two hosts with 4 GPUs each, host 1 GPU 1 used by someone else's process and
    host 2 GPU 2 over the memory threshold
    WHEN 40 runs (1 and 2 GPUs, alternating, no host named) are submitted
    THEN each runs once, no two at a time on one GPU, never on the busy GPUs, 2-GPU runs on one
    host, with CUDA_VISIBLE_DEVICES = the leased indices; and once those GPUs are free they
    are used."""
    lab = fresh_lab(n_hosts=2)
    h1, h2 = lab
    rows1, rows2 = fakegpu.gpu_rows(4, 1), fakegpu.gpu_rows(4, 2)
    rows2[2] = {**rows2[2], "used": 30000}
    fakegpu.install(h1, rows1, apps=[foreign_app(h1, rows1[1])])
    fakegpu.install(h2, rows2)
    for h in lab:
        assert register(admin, h)["host_key_fingerprint"] == h.host_key_fingerprint

    state = cluster_when(
        member.client,
        lambda s: s["gpus"] == {"total": 8, "free": 6, "leased": 0, "busy_foreign": 1, "busy": 1},
    )
    assert state["type"] == "local_gpu" and state["gpu_count"] == 8
    assert gpu_row(state, h1.name, 1)["state"] == "busy_foreign"
    assert gpu_row(state, h1.name, 1)["processes"][0]["run_id"] is None
    assert gpu_row(state, h2.name, 2)["state"] == "busy"
    assert gpu_row(state, h2.name, 2)["memory_used_mb"] == 30000
    for h, rows in ((h1, rows1), (h2, rows2)):
        row = host_row(state, h.name)
        assert row["gpu_count"] == 4 and row["gpu_source"] != "none"
        assert [g["uuid"] for g in row["gpus"]] == [r["uuid"] for r in rows]
    assert Gpu.objects.filter(present=True).count() == 8
    health = member.client.get("/api/wild/v2/system-health").json()
    assert (health["gpu_total"], health["gpu_free"]) == (8, 6)
    assert 0 < health["max_new_runs"] <= 8

    # Hosts without runs are polled every poll interval (0.5 s here) all the same.
    before = {h.name: len(fakegpu.calls(h)) for h in lab}
    time.sleep(3)
    for h in lab:
        assert len(fakegpu.calls(h)) - before[h.name] >= 4, f"{h.name} is not polled"

    ids, wants = [], {}
    for i in range(40):
        n = 1 + i % 2
        run_id = create(
            member.client,
            name=f"share-{i}",
            gpus=n,
            gpuwrap_config=GPUWRAP,
            command=LOGGED.format(log="gpu-log", seconds=1),
        )
        ids.append(run_id)
        wants[run_id] = n

    # While they run: what the API says each running run leased, queued runs' reasons, and
    # that the busy GPUs stay busy and out of every lease.
    seen_leases: dict[str, tuple[str, list[int]]] = {}
    reasons: set[str] = set()
    max_leased = 0

    def watch() -> bool:
        nonlocal max_leased
        page = member.client.get("/api/runs?status=running,queued&limit=500").json()["results"]
        for r in page:
            if r["status"] == "running" and r["leased_gpus"]:
                seen_leases[r["id"]] = (r["host"], sorted(g["index"] for g in r["leased_gpus"]))
            if r["status"] == "queued" and r["waiting_reason"]:
                reasons.add(r["waiting_reason"])
        now = cluster(member.client)
        assert gpu_row(now, h1.name, 1)["state"] == "busy_foreign", now
        assert gpu_row(now, h2.name, 2)["state"] == "busy", now
        assert now["gpus"]["leased"] <= 6 and now["gpus"]["total"] == 8, now["gpus"]
        max_leased = max(max_leased, now["gpus"]["leased"])
        return Run.objects.filter(pk__in=ids, status__in=TERMINAL).count() == len(ids)

    eventually(watch, 240, lambda: runs_summary(ids), 0.5)
    assert Counter(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {
        "finished": 40
    }, runs_summary(ids)

    starts, ends = merged_logs(lab)
    by_gpu = check_once_and_exclusive(ids, starts, ends)
    assert (h1.name, 1) not in by_gpu, f"someone else's GPU was used: {by_gpu[(h1.name, 1)]}"
    assert (h2.name, 2) not in by_gpu, (
        f"the GPU over the threshold was used: {by_gpu[(h2.name, 2)]}"
    )
    assert {h for h, _ in by_gpu} == {h1.name, h2.name}, "both hosts took work"
    assert max_leased >= 4, f"at most {max_leased} GPUs were ever leased at once"

    runs = {r.id: r for r in Run.objects.filter(pk__in=ids).select_related("host")}
    for run_id in ids:
        [(hostname, indices, _, order)] = starts[run_id]
        assert len(indices) == wants[run_id], (run_id, indices)
        assert order == "PCI_BUS_ID", run_id
        assert runs[run_id].host.name == hostname, "the run ran where Labsite says"
        leases = GpuLease.objects.filter(run_id=run_id).select_related("gpu__host")
        assert {lease.gpu.host.name for lease in leases} == {hostname}, "one host per run"
        assert sorted(lease.gpu.index for lease in leases) == indices, (
            f"{run_id}: CUDA_VISIBLE_DEVICES {indices} is not what it leased"
        )
        assert all(lease.released_at is not None for lease in leases), "leases released"
    assert len(seen_leases) >= 5, f"the API showed leased_gpus for only {len(seen_leases)} runs"
    for run_id, (hostname, indices) in seen_leases.items():
        assert (hostname, indices) == (starts[run_id][0][0], starts[run_id][0][1]), run_id
    assert any("GPU" in r for r in reasons), f"queued runs never said why: {reasons}"
    assert any(re.search(r"\b2 GPU", r) for r in reasons), f"no 2-GPU waiting reason: {reasons}"

    state = cluster_when(member.client, totals_are(free=6, leased=0))
    assert state["gpus"]["busy_foreign"] == 1 and state["gpus"]["busy"] == 1

    # Phase 2: both busy GPUs come free; 8 runs at once need all 8.
    fakegpu.set_apps(h1, [])
    rows2[2] = {**rows2[2], "used": 4}
    fakegpu.set_gpus(h2, rows2)
    cluster_when(member.client, totals_are(total=8, free=8, leased=0, busy_foreign=0, busy=0))
    more = [
        create(
            member.client,
            name=f"all-{i}",
            gpus=1,
            gpuwrap_config=GPUWRAP,
            command=LOGGED.format(log="gpu-log2", seconds=5),
        )
        for i in range(8)
    ]
    all_ended(more, 120)
    assert set(Run.objects.filter(pk__in=more).values_list("status", flat=True)) == {"finished"}
    starts2, ends2 = merged_logs(lab, "gpu-log2")
    by_gpu2 = check_once_and_exclusive(more, starts2, ends2)
    assert (h1.name, 1) in by_gpu2 and (h2.name, 2) in by_gpu2, sorted(by_gpu2)
    assert len(by_gpu2) == 8, f"8 concurrent runs used only {sorted(by_gpu2)}"


# --- b) CPU hosts ------------------------------------------------------------------------


def test_hosts_without_a_working_nvidia_smi_are_cpu_hosts(fresh_lab, celery_worker, admin, member):
    """GIVEN one host with no nvidia-smi and one whose nvidia-smi fails (garbage, exit 9)
    THEN both are CPU hosts with no GPU (never busy ones), the cluster is cpu_only, a GPU run
    waits visibly and can be stopped, and CPU work still runs there."""
    lab = fresh_lab(n_hosts=2)
    h1, h2 = lab
    fakegpu.remove(h1)
    fakegpu.garbage(h2)
    for h in lab:
        register(admin, h)

    state = cluster_when(
        member.client,
        lambda s: all(host_row(s, h.name)["note"].startswith("CPU host") for h in lab),
    )
    for h in lab:
        row = host_row(state, h.name)
        assert row["gpu_source"] == "none" and row["gpu_count"] == 0 and row["gpus"] == []
        assert row["state"] == "online", row
    assert state["type"] == "cpu_only" and state["gpu_count"] == 0
    assert state["gpus"] == {"total": 0, "free": 0, "leased": 0, "busy_foreign": 0, "busy": 0}
    assert not Gpu.objects.filter(host__name__in=[h1.name, h2.name], present=True).exists()
    health = member.client.get("/api/wild/v2/system-health").json()
    assert (health["gpu_total"], health["gpu_free"]) == (0, 0)
    assert fakegpu.calls(h2), "the failing nvidia-smi was never asked"

    gpu_run = create(
        member.client, name="wants-gpu", gpuwrap_config=GPUWRAP, command="touch ~/gpu-ran"
    )
    reason = eventually(
        lambda: Run.objects.get(pk=gpu_run).waiting_reason,
        30,
        lambda: str(Run.objects.filter(pk=gpu_run).values()),
    )
    assert "GPU" in reason, reason
    time.sleep(3)  # several scheduler passes
    run = Run.objects.get(pk=gpu_run)
    assert run.status == "queued" and not GpuLease.objects.filter(run=run).exists()
    assert member.client.get(f"/api/runs/{gpu_run}").json()["waiting_reason"] == run.waiting_reason
    stopped = member.client.post(f"/api/runs/{gpu_run}/stop")
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped", stopped.content
    time.sleep(2)
    assert Run.objects.get(pk=gpu_run).status == "stopped"
    assert not any((Path(h.home) / "gpu-ran").exists() for h in lab)

    # Still CPU hosts after many polls, and CPU work runs on them.
    for h in lab:
        cpu = create(member.client, h, name="cpu-work", command="hostname")
        assert (r := ended(cpu)).status == "finished", (r.status, r.reason, r.error)
    state = cluster(member.client)
    assert state["type"] == "cpu_only" and state["gpus"]["total"] == 0
    assert all(host_row(state, h.name)["gpu_source"] == "none" for h in lab)


# --- c) a GPU that disappears ------------------------------------------------------------


def test_a_gpu_gone_from_nvidia_smi_is_not_present_not_counted_and_never_leased(
    fresh_lab, celery_worker, admin, member
):
    [h] = fresh_lab(n_hosts=1)
    rows = fakegpu.gpu_rows(4, 1)
    fakegpu.install(h, rows)
    register(admin, h)
    cluster_when(member.client, totals_are(total=4, free=4))
    assert Gpu.objects.filter(uuid=rows[3]["uuid"], present=True).exists()

    fakegpu.set_gpus(h, rows[:3])  # fell off the bus
    gone = eventually(
        lambda: (g := Gpu.objects.get(uuid=rows[3]["uuid"])) and not g.present and g,
        30,
        lambda: str(Gpu.objects.filter(uuid=rows[3]["uuid"]).values()),
    )
    assert gone.present is False
    state = cluster_when(member.client, totals_are(total=3))
    assert state["gpus"]["free"] == 3 and state["gpu_count"] == 3
    row = host_row(state, h.name)
    assert row["gpu_count"] == 3
    assert rows[3]["uuid"] not in [g["uuid"] for g in row["gpus"]]
    assert member.client.get("/api/wild/v2/system-health").json()["gpu_total"] == 3

    ids = [
        create(
            member.client,
            name=f"after-loss-{i}",
            gpus=1,
            gpuwrap_config=GPUWRAP,
            command=LOGGED.format(log="gpu-log", seconds=2),
        )
        for i in range(4)
    ]
    all_ended(ids, 90)
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"finished"}
    by_gpu = check_once_and_exclusive(ids, *read_gpu_log(h))
    assert set(by_gpu) <= {(h.name, 0), (h.name, 1), (h.name, 2)}, sorted(by_gpu)
    assert not GpuLease.objects.filter(gpu=gone).exists()
    assert not Gpu.objects.get(uuid=rows[3]["uuid"]).present


# --- d) our processes and someone else's -------------------------------------------------


def test_our_process_on_its_gpu_is_leased_and_on_another_gpu_raises_an_alert(
    fresh_lab, celery_worker, admin, member
):
    [h] = fresh_lab(n_hosts=1)
    rows = fakegpu.gpu_rows(2, 1)
    fakegpu.install(h, rows)
    register(admin, h)
    cluster_when(member.client, totals_are(total=2, free=2))

    # `exec` keeps the pid: the process that would hold the GPU is the command itself, whose
    # environment carries LABSITE_RUN_ID (the wrapper's pid in Run.pid does not).
    run_id = create(
        member.client,
        h,
        name="trainer",
        gpus=1,
        gpuwrap_config=GPUWRAP,
        command="echo $$ > ~/trainer.pid; exec sleep 300",
    )
    eventually(
        lambda: Run.objects.get(pk=run_id).status == "running", 60, lambda: runs_summary([run_id])
    )
    pid = our_pid(h, "trainer.pid")
    assert f"LABSITE_RUN_ID={run_id}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    [leased] = member.client.get(f"/api/runs/{run_id}").json()["leased_gpus"]
    mine = next(r for r in rows if r["uuid"] == leased["uuid"])
    other = next(r for r in rows if r["uuid"] != leased["uuid"])
    assert mine["index"] == leased["index"]

    mine_busy = {**mine, "used": 30004, "util": 97}
    fakegpu.set_gpus(h, sorted([mine_busy, other], key=lambda r: r["index"]))
    fakegpu.set_apps(h, [{"uuid": mine["uuid"], "pid": pid, "used": 30000}])
    want = [{"pid": pid, "used_memory_mb": 30000, "run_id": run_id}]
    state = cluster_when(
        member.client,
        lambda s: gpu_row(s, h.name, mine["index"])["processes"] == want,
    )
    row = gpu_row(state, h.name, mine["index"])
    assert row["state"] == "leased" and row["run_id"] == run_id, row
    assert state["gpus"] == {"total": 2, "free": 1, "leased": 1, "busy_foreign": 0, "busy": 0}
    assert Gpu.objects.get(uuid=mine["uuid"]).processes == want
    assert not Alert.objects.filter(message__contains=run_id).exists()
    # The poll confirms, in the run's audit trail, that its process is on the GPU it leased.
    confirmed = eventually(
        lambda: RunEvent.objects.filter(run_id=run_id, reason="gpu_confirmed").first(),
        30,
        lambda: str(list(RunEvent.objects.filter(run_id=run_id).values_list("reason", flat=True))),
    )
    assert confirmed.message == f"seen on GPU {mine['index']} of {h.name} (pid {pid})"

    # The same process shows up on the GPU it did not lease: an alert that names the run.
    fakegpu.set_gpus(
        h,
        sorted([mine_busy, {**other, "used": 2052, "util": 40}], key=lambda r: r["index"]),
    )
    fakegpu.set_apps(
        h,
        [
            {"uuid": mine["uuid"], "pid": pid, "used": 30000},
            {"uuid": other["uuid"], "pid": pid, "used": 2048},
        ],
    )
    alert = eventually(
        lambda: Alert.objects.filter(message__contains=run_id).first(),
        30,
        lambda: str(list(Alert.objects.values_list("message", flat=True))),
    )
    assert alert.status == "open"
    state = cluster(member.client)
    other_row = gpu_row(state, h.name, other["index"])
    assert other_row["state"] != "free" and other_row["run_id"] is None, other_row
    assert not GpuLease.objects.filter(gpu__uuid=other["uuid"]).exists()

    assert RunEvent.objects.filter(run_id=run_id, reason="gpu_confirmed").count() == 1, "once"

    assert member.client.post(f"/api/runs/{run_id}/stop").status_code == 200
    assert ended(run_id).status == "stopped"
    assert not GpuLease.objects.filter(run_id=run_id, released_at__isnull=True).exists()


# --- e) CUDA out of memory vs GPU contention ---------------------------------------------


def test_cuda_oom_fails_the_run_and_busy_devices_requeue_it(
    fresh_lab, celery_worker, admin, member
):
    [h] = fresh_lab(n_hosts=1)
    fakegpu.install(h, fakegpu.gpu_rows(2, 1))
    register(admin, h)
    cluster_when(member.client, totals_are(total=2, free=2))

    oom = create(
        member.client,
        h,
        name="oom",
        gpuwrap_config=FAST_RETRY,
        command=f"echo start >> ~/oom-starts; cat >&2 <<'EOF'\n{OOM_TRACE}EOF\nexit 1",
    )
    busy = create(
        member.client,
        h,
        name="contended",
        gpuwrap_config=FAST_RETRY,
        command=f"echo start >> ~/busy-starts; cat >&2 <<'EOF'\n{BUSY_TRACE}EOF\nexit 1",
    )
    flaky = create(
        member.client,
        h,
        name="contended-once",
        gpuwrap_config=FAST_RETRY,
        command=(
            "echo start >> ~/flaky-starts; "
            "if [ -e ~/flaky-once ]; then echo trained; exit 0; fi; touch ~/flaky-once; "
            f"cat >&2 <<'EOF'\n{BUSY_TRACE}EOF\nexit 1"
        ),
    )

    run = ended(oom, 60)
    assert (run.status, run.reason, run.exit_code) == ("failed", "cuda_oom", 1)
    assert (Path(h.home) / "oom-starts").read_text().splitlines() == ["start"]
    assert not RunEvent.objects.filter(run_id=oom, reason="gpu_busy_requeue").exists()
    assert "CUDA out of memory" in member.client.get(f"/api/runs/{oom}/logs").json()["content"]

    run = ended(busy, 120)
    events = list(RunEvent.objects.filter(run_id=busy).order_by("id"))
    requeues = [e for e in events if e.reason == "gpu_busy_requeue"]
    starts_text = (Path(h.home) / "busy-starts").read_text()
    assert len(requeues) == 2, (
        [(e.from_status, e.to_status, e.reason, e.message) for e in events],
        starts_text,
    )
    assert all(e.to_status == "queued" for e in requeues)
    assert all(e.from_status in ("running", "launching") for e in requeues)
    assert (run.status, run.reason, run.exit_code) == ("failed", "exit_code", 1)
    assert (Path(h.home) / "busy-starts").read_text().splitlines() == ["start"] * 3
    assert not GpuLease.objects.filter(run_id=busy, released_at__isnull=True).exists()

    run = ended(flaky, 120)
    assert (run.status, run.exit_code) == ("finished", 0), (run.status, run.reason)
    assert RunEvent.objects.filter(run_id=flaky, reason="gpu_busy_requeue").count() == 1
    assert (Path(h.home) / "flaky-starts").read_text().splitlines() == ["start"] * 2
    assert cluster_when(member.client, totals_are(free=2, leased=0))


# --- f) waiting for GPUs: retries, no_gpu, memory asks -----------------------------------


def test_retries_bound_the_wait_and_min_free_memory_is_honoured(
    fresh_lab, celery_worker, admin, member
):
    [h] = fresh_lab(n_hosts=1)
    [row] = fakegpu.gpu_rows(1, 1)
    fakegpu.install(h, [row], apps=[foreign_app(h, row)])
    register(admin, h)
    cluster_when(member.client, totals_are(total=1, free=0, busy_foreign=1))

    bounded = create(
        member.client,
        h,
        name="bounded",
        gpuwrap_config={"enabled": True, "retries": 2, "retry_delay_seconds": 1},
        command="touch ~/bounded-ran",
    )
    forever = create(
        member.client, h, name="forever", gpuwrap_config=FAST_RETRY, command="touch ~/forever-ran"
    )
    run = ended(bounded, 60)
    assert (run.status, run.reason) == ("failed", "no_gpu"), (run.status, run.reason, run.error)
    waited = (run.ended_at - run.created_at).total_seconds()
    assert 2 <= waited <= 30, f"gave up after {waited:.1f} s; 2 retries x 1 s was asked"
    time.sleep(3)
    run = Run.objects.get(pk=forever)
    assert run.status == "queued" and "GPU" in run.waiting_reason, run.waiting_reason
    stopped = member.client.post(f"/api/runs/{forever}/stop").json()
    assert stopped["status"] == "stopped", stopped
    assert not (Path(h.home) / "bounded-ran").exists()
    assert not (Path(h.home) / "forever-ran").exists()

    # The GPU comes free (81916 MiB free): asking 70000 MiB needs 84000 and waits, 60000 needs
    # 72000 and runs, and the big ask does not hold the small one back.
    fakegpu.set_apps(h, [])
    cluster_when(member.client, totals_are(total=1, free=1))
    big = create(
        member.client,
        h,
        name="big",
        gpuwrap_config=FAST_RETRY,
        min_free_mem_mb=70000,
        command="touch ~/big-ran",
    )
    small = create(
        member.client,
        h,
        name="small",
        gpuwrap_config=FAST_RETRY,
        min_free_mem_mb=60000,
        command=LOGGED.format(log="gpu-log", seconds=0),
    )
    run = ended(small, 60)
    assert run.status == "finished", (run.status, run.reason)
    starts, _ = read_gpu_log(h)
    assert [s[1] for s in starts[small]] == [[0]]
    run = Run.objects.get(pk=big)
    assert run.status == "queued" and run.waiting_reason, run.waiting_reason
    assert member.client.post(f"/api/runs/{big}/stop").json()["status"] == "stopped"
    assert not (Path(h.home) / "big-ran").exists()


def test_the_fake_nvidia_smi_answers_two_queries_and_refuses_the_rest(fresh_lab):
    """The harness itself: the two queries print the state files; anything else exits 2."""
    [h] = fresh_lab(n_hosts=1)
    rows = fakegpu.gpu_rows(2, 1)
    fakegpu.install(h, rows, apps=[{"uuid": rows[1]["uuid"], "pid": 48213, "used": 40960}])
    ok = fakegpu.query(h, fakegpu.QUERY_GPU, fakegpu.FORMAT)
    assert ok.returncode == 0 and ok.stdout == fakegpu.format_gpus(rows)
    assert ok.stdout.splitlines()[0] == f"0, {rows[0]['uuid']}, NVIDIA A100-SXM4-80GB, 81920, 4, 0"
    apps = fakegpu.query(h, fakegpu.QUERY_APPS, fakegpu.FORMAT)
    assert apps.returncode == 0 and apps.stdout == f"{rows[1]['uuid']}, 48213, 40960\n"
    for args in ([], ["-L"], ["--query-gpu=index", fakegpu.FORMAT], [fakegpu.QUERY_GPU]):
        bad = fakegpu.query(h, *args)
        assert bad.returncode == 2 and bad.stdout == "" and "unsupported" in bad.stderr, args
    fakegpu.garbage(h)
    failed = fakegpu.query(h, fakegpu.QUERY_GPU, fakegpu.FORMAT)
    assert failed.returncode == 9 and "NVIDIA-SMI has failed" in failed.stdout
    fakegpu.heal(h)
    assert fakegpu.query(h, fakegpu.QUERY_GPU, fakegpu.FORMAT).returncode == 0
    assert len(fakegpu.calls(h)) == 8
    fakegpu.remove(h)
    assert fakegpu.query(h, fakegpu.QUERY_GPU, fakegpu.FORMAT).returncode == 127
