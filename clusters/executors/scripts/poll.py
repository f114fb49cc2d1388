"""Reports every given run on this host, and with "gpu" its nvidia-smi inventory: one round
trip for all of it.

Sent to `python3 -I -S -` after one line, LABSITE_PARAMS = "<base64 of the JSON request>"
(protocol.py, poll_params): isolated and without site, so that a host's PYTHONPATH,
PYTHONSTARTUP or a conda env's .pth files can neither change the poll nor slow each one. It
runs on the host's own python3, so it sticks to what Python 3.7 has: no f-string `=`, no
walrus, quoted annotations (which 3.7 never evaluates). Prints one JSON object:
{"ok": 1, "runs": {run_id: report}, "gpu": null | {...}}.
"""

import base64
import json
import os
import sys

# Not `from typing import ...`: importing typing (and re with it) is ~15 % of a poll's start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def read(path: str) -> "str | None":
    """A small file of the run directory, stripped; None when it is not there."""
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return None


def alive(pid: int, marker: bytes) -> bool:
    """Whether pid is a live wrapper of this run: not a zombie, and its command line names the
    run directory's launch.sh (a pid reused by another process after a reboot is not ours)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker in f.read()
    except (OSError, IndexError):
        return False


def number(text: "str | None", kind: "Any") -> "Any":
    try:
        return kind(text) if text else None
    except ValueError:
        return None


def run_report(ref: "dict[str, Any]", max_log: int, max_metrics: int) -> "dict[str, Any]":
    d = os.path.join(os.path.expanduser(ref["root"]), ref["dir"])
    rep: dict[str, Any] = {}
    pid = read(os.path.join(d, "pid"))
    code = read(os.path.join(d, "exit_code"))
    rep["pid"] = int(pid) if pid and pid.isdigit() else None
    marker = os.fsencode(d + "/launch.sh")
    if code is None and rep["pid"] is not None and not alive(rep["pid"], marker):
        # The wrapper writes exit_code before it exits: read it again, or a run that ended
        # between the two reads would look vanished.
        code = read(os.path.join(d, "exit_code"))
        rep["state"] = "exited" if code is not None else "vanished"
    elif code is not None:
        rep["state"] = "exited"
    elif rep["pid"] is not None:
        rep["state"] = "running"
    else:
        rep["state"] = "starting" if os.path.isdir(d) else "missing"
    rep["exit_code"] = number(code, int)
    rep["started_at"] = number(read(os.path.join(d, "started_at")), float)

    # New log bytes from the server's offset, at most max_log of them per poll.
    log = os.path.join(d, "output.log")
    try:
        size = os.path.getsize(log)
        off = min(max(0, ref["log"]), size)
        with open(log, "rb") as f:
            f.seek(off)
            chunk = f.read(min(size - off, max_log))
    except OSError:
        size, off, chunk = 0, 0, b""
    rep.update(log_size=size, log_offset=off, log_chunk=base64.b64encode(chunk).decode())

    # Whole metric lines only: a line the run is still writing waits for the next poll.
    lines: list[str] = []
    moff = ref["metrics"]
    try:
        with open(os.path.join(d, "metrics.jsonl"), "rb") as f:
            f.seek(moff)
            data = f.read(max_metrics)
        end = data.rfind(b"\n") + 1
        lines = data[:end].decode(errors="replace").splitlines()
        moff += end
    except OSError:
        pass
    rep.update(metrics_offset=moff, metrics_lines=lines)
    return rep


def run_of(pid: str) -> "str | None":
    """The LABSITE_RUN_ID in a process's environment: which run a GPU process belongs to."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"LABSITE_RUN_ID="):
                    return item[len(b"LABSITE_RUN_ID=") :].decode(errors="replace")
    except OSError:
        pass
    return None


def machine() -> "dict[str, Any]":
    """The CPUs this user may run on (its affinity, which a cgroup or taskset narrows) and
    the memory the machine has: what CPU runs are placed against."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 0
    memory_mb = 0
    text = read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                memory_mb = int(fields[1]) // 1024
            break
    return {"cpus": cpus, "memory_mb": memory_mb}


def gpu_report(q_gpu: "list[str]", q_apps: "list[str]") -> "dict[str, Any]":
    """nvidia-smi's raw answers (parsed on the server), or why there are none; and the
    machine's CPUs and memory (the rest of the host's inventory)."""
    # Imported here: a poll without GPUs, the common one, saves their ~10 ms of imports.
    import shutil
    import subprocess

    gpu: dict[str, Any] = {"query_gpu": "", "query_apps": "", "error": "", "pid_runs": {}}
    gpu.update(machine())
    exe = shutil.which("nvidia-smi")
    if exe is None:
        gpu["error"] = "nvidia-smi not found"
        return gpu
    for key, args in (("query_gpu", q_gpu), ("query_apps", q_apps)):
        try:
            p = subprocess.run([exe, *args], capture_output=True, timeout=15)
        except subprocess.TimeoutExpired:
            gpu["error"] = "nvidia-smi did not answer within 15 s"
            break
        if p.returncode != 0:
            msg = (p.stderr or p.stdout).decode(errors="replace").strip().splitlines()
            first = msg[0][:200] if msg else ""
            gpu["error"] = f"nvidia-smi exited {p.returncode}: {first}"
            break
        gpu[key] = p.stdout.decode(errors="replace")
    for line in gpu["query_apps"].splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit():
            run = run_of(parts[1])
            if run is not None:
                gpu["pid_runs"][parts[1]] = run
    return gpu


def report(req: "dict[str, Any]") -> "dict[str, Any]":
    runs = {r["id"]: run_report(r, req["max_log"], req["max_metrics"]) for r in req["runs"]}
    gpu = gpu_report(req["q_gpu"], req["q_apps"]) if req.get("gpu") else None
    return {"ok": 1, "runs": runs, "gpu": gpu}


if __name__ == "__main__":
    request = json.loads(base64.b64decode(globals()["LABSITE_PARAMS"]))
    sys.stdout.write(json.dumps(report(request)))
