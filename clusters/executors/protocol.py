"""The run directory protocol, as the scripts that launch, poll and cancel runs on a host.

The same scripts serve every transport (local subprocess, SSH): each is sent on stdin to
`bash -s` or `python3 -I -S -`, so nothing the user wrote appears in a process list or in argv.
User strings reach the host only shell-quoted or base64-encoded.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

MAX_LOG_CHUNK = 4 * 2**20  # bytes copied per run per poll; the rest comes next cycle
MAX_METRICS_CHUNK = 512 * 2**10
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class ProtocolError(Exception):
    """The host answered with something the protocol does not allow."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a host needs to start a run; knows nothing of plans, sweeps or users."""

    run_id: str
    command: str
    run_root: str
    workdir: str = ""
    env: dict[str, str] = field(default_factory=dict)
    env_setup: str = ""
    cuda_visible_devices: list[int] | None = None
    dir_name: str = ""  # the run directory, when not the run id (a later attempt)

    @property
    def directory(self) -> str:
        return self.dir_name or self.run_id


@dataclass(frozen=True)
class RunRef:
    """A run to poll, with how much of its log and metrics the server already has."""

    run_id: str
    run_root: str
    log_offset: int = 0
    metrics_offset: int = 0
    dir_name: str = ""

    @property
    def directory(self) -> str:
        return self.dir_name or self.run_id


@dataclass
class GpuReport:
    """What the host's nvidia-smi said, raw, for the server to parse; pids mapped to runs."""

    query_gpu: str = ""
    query_apps: str = ""
    error: str = ""  # why there is no usable answer (not installed, exited non-zero, timed out)
    pid_runs: dict[int, str] = field(default_factory=dict)


@dataclass
class RunReport:
    state: str  # running | exited | vanished | starting | missing
    pid: int | None = None
    exit_code: int | None = None
    started_at: float | None = None
    log_size: int = 0
    log_offset: int = 0
    log_chunk: bytes = b""
    metrics_offset: int = 0
    metrics_lines: list[str] = field(default_factory=list)


def check_run_id(run_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        raise ValueError(f"run id {run_id!r} is not safe as a directory name")
    return run_id


def root_expr(run_root: str) -> str:
    """A shell expression for the run root; `~/` expands to the host user's $HOME."""
    root = run_root.rstrip("/") or "/"
    if root == "~":
        return '"$HOME"'
    if root.startswith("~/"):
        return '"$HOME"/' + shlex.quote(root[2:])
    return shlex.quote(root)


def dir_expr(run_root: str, run_id: str) -> str:
    """A shell expression for the run directory (the events file sits beside it, in the root)."""
    return f"{root_expr(run_root)}/{shlex.quote(check_run_id(run_id))}"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def wrapper_script(spec: LaunchSpec) -> str:
    """launch.sh: leads the process group, runs the command, writes exit_code atomically."""
    check_run_id(spec.run_id)
    d = dir_expr(spec.run_root, spec.directory)
    lines = [
        "#!/usr/bin/env bash",
        f"d={d}",
        'echo $$ > "$d/pid.tmp" && mv -f "$d/pid.tmp" "$d/pid"',
        'date +%s.%N > "$d/started_at"',
        # After exit_code, one line in the host's events file wakes the watcher (watch_script);
        # a line under PIPE_BUF appended with O_APPEND never interleaves with another run's.
        'finish() { printf "%s\\n" "$1" > "$d/exit_code.tmp" && mv -f "$d/exit_code.tmp" "$d/exit_code"; '
        'printf "%s\\n" "${d##*/}" >> "${d%/*}/.events" 2>/dev/null; exit 0; }',
    ]
    if spec.workdir:
        w = shlex.quote(spec.workdir)
        if spec.workdir.startswith("~/"):
            w = '"$HOME"/' + shlex.quote(spec.workdir[2:])
        lines.append(
            f'cd {w} 2>>"$d/output.log" || {{ echo "labsite: cannot cd to the workdir" >> "$d/output.log"; finish 126; }}'
        )
    if spec.env_setup:
        # The host's own activation line (set by an admin), run in this shell so `source` works.
        lines.append(
            f'{{ {spec.env_setup} ; }} >> "$d/output.log" 2>&1 || echo "labsite: env_setup exited $?" >> "$d/output.log"'
        )
    exports = {"PYTHONUNBUFFERED": "1", "LABSITE_RUN_ID": spec.run_id}
    if spec.cuda_visible_devices is not None:
        exports["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        exports["CUDA_VISIBLE_DEVICES"] = ",".join(str(int(i)) for i in spec.cuda_visible_devices)
    for name, value in spec.env.items():
        if not ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        exports[name] = str(value)
    for name, value in exports.items():
        lines.append(f"export {name}={shlex.quote(value)}")
    lines += [
        'export LABSITE_RUN_DIR="$d"',
        # A handler (not an ignore, which children would inherit) keeps the wrapper alive on
        # SIGTERM to the group, so it outlives the command and still writes its exit code.
        "trap true TERM INT HUP",
        'bash "$d/command.sh" >> "$d/output.log" 2>&1 < /dev/null &',
        "child=$!",
        'wait "$child"; code=$?',
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done',
        'finish "$code"',
    ]
    return "\n".join(lines) + "\n"


WATCH_READY = "LABSITE_WATCHING"
WATCH_ALIVE = "LABSITE_ALIVE"


def watch_script(run_root: str, heartbeat_seconds: int = 15) -> str:
    """Streams the directory name of each run whose command ends on this host, as it ends.

    `tail -F` follows the events file the wrappers append to (inotify where the kernel has it),
    from the size it had before the ready line: nothing appended after that line is missed.
    The script reads its stdin, which stays open while the watcher holds the channel: EOF (the
    watcher went away) ends it and its tail, so no follower outlives the connection; a tail that
    died ends the script too (within a second), so the watcher starts a new one. A heartbeat
    line every `heartbeat_seconds` lets the watcher tell a quiet host from a dead connection.
    The whole body is one compound command, so bash parses it before `read` touches stdin, and
    it ends in `exit`: bash -s would otherwise wait on stdin for more script.
    """
    beat = max(1, int(heartbeat_seconds))
    return f"""{{
set -u
umask 077
f={root_expr(run_root)}/.events
mkdir -p "${{f%/*}}" && : >> "$f" || exit 1
n=$(wc -c < "$f")
tail -c +$((n + 1)) -F "$f" 2>/dev/null &
t=$!
trap 'kill $t 2>/dev/null' EXIT
trap '' PIPE
echo {WATCH_READY}
i=0
while :; do
  read -r -t 1 _; rc=$?
  [ "$rc" -gt 128 ] || break
  kill -0 "$t" 2>/dev/null || break
  i=$((i + 1))
  [ "$i" -lt {beat} ] && continue
  i=0
  echo {WATCH_ALIVE} || break
done
exit 0
}}
"""


def launch_script(spec: LaunchSpec) -> str:
    """One exec: write the run directory and start the wrapper detached; safe to run twice."""
    d = dir_expr(spec.run_root, spec.directory)
    return f"""set -u
umask 077
d={d}
mkdir -p "$d"
started() {{ echo "LABSITE_PID $(cat "$d/pid")"; exit 0; }}
[ -e "$d/cancelled" ] && {{ echo "LABSITE_CANCELLED"; exit 0; }}
[ -s "$d/pid" ] && started
if ! mkdir "$d/.launch" 2>/dev/null; then
  for _ in $(seq 500); do [ -s "$d/pid" ] && started; sleep 0.01; done
  echo "LABSITE_ERROR another launch of this run holds the directory"; exit 1
fi
printf %s {_b64(spec.command)} | base64 -d > "$d/command.sh"
printf %s {_b64(wrapper_script(spec))} | base64 -d > "$d/launch.sh"
: >> "$d/output.log"
setsid bash "$d/launch.sh" < /dev/null > /dev/null 2>&1 &
for _ in $(seq 1000); do [ -s "$d/pid" ] && started; sleep 0.005; done
echo "LABSITE_ERROR the wrapper did not start within 5 s"; exit 1
"""


def parse_launch(stdout: str) -> int | None:
    """The wrapper's pid, or None when the run was cancelled before it started."""
    for line in stdout.splitlines():
        if line.startswith("LABSITE_PID "):
            return int(line.split()[1])
        if line.startswith("LABSITE_CANCELLED"):
            return None
        if line.startswith("LABSITE_ERROR"):
            raise ProtocolError(line.removeprefix("LABSITE_ERROR").strip())
    raise ProtocolError(f"unexpected launch answer: {stdout.strip()[:200]!r}")


_POLL = r"""
import base64, json, os, sys
req = json.loads(base64.b64decode(sys.argv[1] if len(sys.argv) > 1 else REQ))
def path(root, run_id, name):
    root = os.path.expanduser(root)
    return os.path.join(root, run_id, name)
def read(p):
    try:
        with open(p, "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return None
def alive(pid, marker):
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return marker in f.read()
    except OSError:
        return False
out = {}
for r in req["runs"]:
    rid, root = r["dir"], r["root"]
    d = os.path.join(os.path.expanduser(root), rid)
    rep = {}
    pid = read(path(root, rid, "pid"))
    code = read(path(root, rid, "exit_code"))
    rep["pid"] = int(pid) if pid and pid.isdigit() else None
    if code is None and rep["pid"] is not None and not alive(rep["pid"], (d + "/launch.sh").encode()):
        code = read(path(root, rid, "exit_code"))
        rep["state"] = "exited" if code is not None else "vanished"
    elif code is not None:
        rep["state"] = "exited"
    elif rep["pid"] is not None:
        rep["state"] = "running"
    else:
        rep["state"] = "starting" if os.path.isdir(d) else "missing"
    try:
        rep["exit_code"] = int(code) if code is not None else None
    except ValueError:
        rep["exit_code"] = None
    started = read(path(root, rid, "started_at"))
    try:
        rep["started_at"] = float(started) if started else None
    except ValueError:
        rep["started_at"] = None
    log = path(root, rid, "output.log")
    try:
        size = os.path.getsize(log)
        off = min(max(0, r["log"]), size)
        with open(log, "rb") as f:
            f.seek(off)
            chunk = f.read(min(size - off, req["max_log"]))
    except OSError:
        size, off, chunk = 0, 0, b""
    rep.update(log_size=size, log_offset=off, log_chunk=base64.b64encode(chunk).decode())
    mpath = path(root, rid, "metrics.jsonl")
    lines, moff = [], r["metrics"]
    try:
        with open(mpath, "rb") as f:
            f.seek(moff)
            data = f.read(req["max_metrics"])
        end = data.rfind(b"\n") + 1
        lines = data[:end].decode(errors="replace").splitlines()
        moff += end
    except OSError:
        pass
    rep.update(metrics_offset=moff, metrics_lines=lines)
    out[r["id"]] = rep
gpu = None
if req.get("gpu"):
    import shutil, subprocess
    gpu = {"query_gpu": "", "query_apps": "", "error": "", "pid_runs": {}}
    exe = shutil.which("nvidia-smi")
    if exe is None:
        gpu["error"] = "nvidia-smi not found"
    else:
        for key, args in (("query_gpu", req["q_gpu"]), ("query_apps", req["q_apps"])):
            try:
                p = subprocess.run([exe] + args, capture_output=True, timeout=15)
            except subprocess.TimeoutExpired:
                gpu["error"] = "nvidia-smi did not answer within 15 s"
                break
            if p.returncode != 0:
                msg = (p.stderr or p.stdout).decode(errors="replace").strip().splitlines()
                gpu["error"] = "nvidia-smi exited %d: %s" % (p.returncode, msg[0][:200] if msg else "")
                break
            gpu[key] = p.stdout.decode(errors="replace")
        for line in gpu["query_apps"].splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) == 3 and parts[1].isdigit():
                try:
                    with open("/proc/%s/environ" % parts[1], "rb") as f:
                        for item in f.read().split(b"\0"):
                            if item.startswith(b"LABSITE_RUN_ID="):
                                gpu["pid_runs"][parts[1]] = item[15:].decode(errors="replace")
                except OSError:
                    pass
sys.stdout.write(json.dumps({"ok": 1, "runs": out, "gpu": gpu}))
"""


def poll_script(refs: list[RunRef], *, gpu: bool = False) -> str:
    """One python3 program reporting every given run (state, exit code, new log bytes, metrics)
    and, with gpu=True, the host's nvidia-smi inventory: one round trip for all of it."""
    from clusters.gpus import QUERY_APPS_ARGS, QUERY_GPU_ARGS

    for ref in refs:
        check_run_id(ref.run_id)
        check_run_id(ref.directory)
    request = {
        "runs": [
            {
                "id": r.run_id,
                "dir": r.directory,
                "root": r.run_root,
                "log": r.log_offset,
                "metrics": r.metrics_offset,
            }
            for r in refs
        ],
        "max_log": MAX_LOG_CHUNK,
        "max_metrics": MAX_METRICS_CHUNK,
        "gpu": gpu,
        "q_gpu": QUERY_GPU_ARGS,
        "q_apps": QUERY_APPS_ARGS,
    }
    return f"REQ = {json.dumps(_b64(json.dumps(request)))}\n{_POLL}"


def parse_gpu(stdout: str) -> GpuReport | None:
    data = json.loads(stdout).get("gpu")
    if data is None:
        return None
    return GpuReport(
        query_gpu=data["query_gpu"],
        query_apps=data["query_apps"],
        error=data["error"],
        pid_runs={int(pid): run_id for pid, run_id in data["pid_runs"].items()},
    )


def parse_poll(stdout: str) -> dict[str, RunReport]:
    try:
        data: dict[str, Any] = json.loads(stdout)
        assert data.get("ok") == 1
    except (ValueError, AssertionError) as exc:
        raise ProtocolError(f"unexpected poll answer: {stdout.strip()[:200]!r}") from exc
    reports = {}
    for run_id, rep in data["runs"].items():
        reports[run_id] = RunReport(
            state=rep["state"],
            pid=rep["pid"],
            exit_code=rep["exit_code"],
            started_at=rep["started_at"],
            log_size=rep["log_size"],
            log_offset=rep["log_offset"],
            log_chunk=base64.b64decode(rep["log_chunk"]),
            metrics_offset=rep["metrics_offset"],
            metrics_lines=rep["metrics_lines"],
        )
    return reports


def cancel_script(run_root: str, run_id: str, grace_seconds: float, dir_name: str = "") -> str:
    """SIGTERM the run's group and every process carrying its LABSITE_RUN_ID, wait, SIGKILL, confirm."""
    check_run_id(run_id)
    d = dir_expr(run_root, dir_name or run_id)
    marker = shlex.quote(f"LABSITE_RUN_ID={run_id}")
    steps = max(1, int(grace_seconds * 10))
    return f"""set -u
d={d}
mkdir -p "$d" && : > "$d/cancelled"
for _ in $(seq 50); do [ -s "$d/pid" ] || [ ! -d "$d/.launch" ] && break; sleep 0.1; done
pgid=$(cat "$d/pid" 2>/dev/null || true)
members() {{
  {{ [ -n "$pgid" ] && ps -e -o pid=,pgid=,stat= | awk -v g="$pgid" '$2 == g && $3 !~ /^Z/ {{ print $1 }}'
    grep -lsza -x {marker} /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3; }} | sort -u | grep -vx "$$" || true
}}
signal() {{ for p in $(members); do kill -"$1" "$p" 2>/dev/null || true; done; }}
signal TERM
for _ in $(seq {steps}); do [ -z "$(members)" ] && break; sleep 0.1; done
left=$(members | wc -l)
if [ "$left" -gt 0 ]; then signal KILL; sleep 0.2; fi
echo "LABSITE_CANCEL term_left=$left left=$(members | wc -l)"
"""


def parse_cancel(stdout: str) -> int:
    """How many processes of the run were still there at the end (0 = nothing left)."""
    match = re.search(r"LABSITE_CANCEL term_left=(\d+) left=(\d+)", stdout)
    if not match:
        raise ProtocolError(f"unexpected cancel answer: {stdout.strip()[:200]!r}")
    return int(match.group(2))
