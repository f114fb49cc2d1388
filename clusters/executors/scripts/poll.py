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


def run_report(
    ref: "dict[str, Any]", max_log: int, max_metrics: int, slurm: bool = False
) -> "dict[str, Any]":
    d = os.path.join(os.path.expanduser(ref["root"]), ref["dir"])
    rep: dict[str, Any] = {}
    pid = read(os.path.join(d, "pid"))
    code = read(os.path.join(d, "exit_code"))
    rep["pid"] = int(pid) if pid and pid.isdigit() else None
    marker = os.fsencode(d + "/launch.sh")
    # A Slurm job's wrapper runs on a compute node: its pid means nothing here (squeue says).
    if code is None and rep["pid"] is not None and not slurm and not alive(rep["pid"], marker):
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
    if slurm:
        rep["slurm_notes"] = stepd_lines(os.path.join(d, "slurm.out"))

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


def stepd_lines(path: str) -> str:
    """The last of slurmstepd's own lines in a job's slurm.out (its --output, where only Slurm
    writes: the wrapper sends the command's output to output.log), such as "error: Exceeded
    job memory limit" or "Detected 1 oom-kill event(s)": at most 2 KB, "" when there are none."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return ""
            f.seek(max(0, size - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.startswith("slurmstepd")]
    return "\n".join(lines[-8:])[-2048:]


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


JOB_PREFIX = "labsite-"


def slurm_command(argv: "list[str]", conf: str) -> str:
    """A Slurm client command's output (SLURM_CONF set where given); ValueError with its words
    when it fails or does not answer within 20 s."""
    import subprocess

    env = dict(os.environ)
    if conf:
        env["SLURM_CONF"] = conf
    try:
        done = subprocess.run(argv, capture_output=True, timeout=20, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ValueError(f"{argv[0]} did not answer within 20 s") from exc
    if done.returncode != 0:
        words = done.stderr.decode(errors="replace").strip()[-300:]
        raise ValueError(words or f"{argv[0]} failed")
    return done.stdout.decode(errors="replace")


def squeue(conf: str) -> "tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]":
    """One squeue for all of this user's jobs, finished ones too (until Slurm's MinJobAge),
    arrays one line per element: Labsite's by run directory (their names are labsite-<run
    directory>: one per attempt), and every job by its id (an array's elements share its
    name: <array id>_<k>). Raises OSError or ValueError with squeue's words when it does not
    answer."""
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    # The job name last: it is the one field a job's owner chooses freely.
    out = slurm_command(
        ["squeue", "-h", "-r", "-t", "all", "-u", user, "-o", "%i|%T|%P|%N|%r|%M|%j"], conf
    )
    jobs: dict[str, dict[str, str]] = {}
    by_id: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        fields = line.strip().split("|", 6)
        if len(fields) != 7 or not fields[6].startswith(JOB_PREFIX):
            continue
        job = {
            "job_id": fields[0],
            "state": fields[1],
            "partition": fields[2],
            "nodes": fields[3],
            "reason": fields[4],
            "elapsed": fields[5],
        }
        by_id[job["job_id"]] = job
        directory = fields[6][len(JOB_PREFIX) :]
        # Submitted twice under one name (by hand, say): the newest counts.
        old = jobs.get(directory)
        if old is None or _job_number(job["job_id"]) > _job_number(old["job_id"]):
            jobs[directory] = job
    return jobs, by_id


def sacct(conf: str, job_ids: "list[str]", since: str) -> "dict[str, dict[str, Any]]":
    """One sacct for jobs that left squeue: by job id, their final state, exit code, nodes, who
    cancelled them and how long they ran. Raises ValueError with sacct's words when it does
    not answer."""
    import pwd

    argv = ["sacct", "--parsable2", "-n", "-X", "-S", since, "-j", ",".join(job_ids)]
    out = slurm_command([*argv, "-o", "JobID,State,ExitCode,NodeList,Partition,Elapsed"], conf)
    found: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6:
            continue
        job_id, state, code, nodes, partition, elapsed = fields
        words = state.split()
        by = ""
        if len(words) == 3 and words[1] == "by":
            # "CANCELLED by 1001": the uid, as a name where this machine knows it.
            try:
                by = pwd.getpwuid(int(words[2])).pw_name
            except (KeyError, ValueError):
                by = words[2]
        head = code.split(":")[0]
        found[job_id] = {
            "job_id": job_id,
            "state": words[0] if words else "",
            "partition": partition,
            "nodes": "" if nodes in ("None assigned", "") else nodes,
            "reason": "",
            "exit_code": int(head) if head.isdigit() else None,
            "by": by,
            "elapsed": elapsed,
        }
    return found


def _job_number(job_id: str) -> "tuple[int, int]":
    head, _, tail = job_id.partition("_")
    return (int(head) if head.isdigit() else 0, int(tail) if tail.isdigit() else 0)


def report(req: "dict[str, Any]") -> "dict[str, Any]":
    slurm = req.get("slurm")
    runs = {
        r["id"]: run_report(r, req["max_log"], req["max_metrics"], slurm is not None)
        for r in req["runs"]
    }
    answer: dict[str, Any] = {"ok": 1, "runs": runs}
    if slurm is not None:
        answer["slurm_calls"] = 1
        try:
            jobs, by_id = squeue(slurm["conf"])
        except (OSError, ValueError) as exc:
            answer.update(slurm_ok=False, slurm_error=str(exc))
        else:
            answer["slurm_ok"] = True
            for r in req["runs"]:
                job_id = r.get("job") or ""
                # An array's element by its id; a run's own job by its name (its directory).
                job = by_id.get(job_id) if "_" in job_id else jobs.get(r["dir"])
                runs[r["id"]]["slurm"] = job
            # Jobs that left squeue (past Slurm's MinJobAge): accounting has their end.
            gone = {
                r["job"]: r["id"]
                for r in req["runs"]
                if r.get("job") and not runs[r["id"]]["slurm"]
            }
            if gone and slurm.get("sacct"):
                answer["slurm_calls"] = 2
                try:
                    ended = sacct(slurm["conf"], sorted(gone), slurm["since"])
                except (OSError, ValueError) as exc:
                    answer["sacct_error"] = str(exc)
                else:
                    for job_id, run_id in gone.items():
                        if job_id in ended:
                            runs[run_id]["slurm"] = ended[job_id]
    answer["gpu"] = gpu_report(req["q_gpu"], req["q_apps"]) if req.get("gpu") else None
    return answer


if __name__ == "__main__":
    request = json.loads(base64.b64decode(globals()["LABSITE_PARAMS"]))
    sys.stdout.write(json.dumps(report(request)))
