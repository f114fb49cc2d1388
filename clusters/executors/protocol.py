"""The run directory protocol, server side: what a host is asked, and how its answers are read.

The scripts themselves are files (scripts/); each goes to the host on stdin after one line of
parameters, which is the only text the server generates for it:

- bash scripts: `LABSITE_PARAMS=<base64>`, the base64 of a flat JSON object of strings in
  which every byte but printable ASCII, and '"', '%' and '\\' too, is written %HH. Base64 is
  shell-safe, so that line can never be anything but an assignment; scripts/params.sh turns
  it back into bytes with builtins (why this encoding: see there).
- poll.py: `LABSITE_PARAMS = "<base64>"`, the base64 of a JSON request.

Nothing the user wrote appears in argv or a process list, and nothing of it is ever pasted
into a script's text. Parse functions raise ProtocolError on any answer they cannot trust.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clusters.gpus import QUERY_APPS_ARGS, QUERY_GPU_ARGS

MAX_LOG_CHUNK = 4 * 2**20  # bytes copied per run per poll; the rest comes next cycle
MAX_METRICS_CHUNK = 512 * 2**10
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
PARAM_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")
# The lines watch.sh prints: once when it follows the events file, then every heartbeat.
WATCH_READY = "LABSITE_WATCHING"
WATCH_ALIVE = "LABSITE_ALIVE"
RUN_STATES = frozenset({"running", "exited", "vanished", "starting", "missing"})


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
    sbatch_args: tuple[str, ...] = ()  # on a Slurm host: sbatch's options (clusters.slurm)

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
    job_id: str = ""  # on a Slurm host: the run's job, once its id is known

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
    # The rest of the host's inventory: the CPUs the host's user may run on, and its memory
    # (None where the host did not say: an older poll.py).
    cpus: int | None = None
    memory_mb: int | None = None


@dataclass(frozen=True)
class SlurmJob:
    """A run's job as squeue showed it (raw: experiments.runner.slurm reads it)."""

    job_id: str
    state: str
    partition: str = ""
    nodes: str = ""
    reason: str = ""
    # From sacct, for a job that left squeue: its exit code, and who cancelled it.
    exit_code: int | None = None
    by: str = ""
    # How long it has run (squeue's %M, sacct's Elapsed: "1-02:03:04"), as Slurm wrote it.
    elapsed: str = ""


@dataclass
class RunReport:
    """One run as its host saw it during a poll."""

    state: str  # running | exited | vanished | starting | missing
    pid: int | None = None
    exit_code: int | None = None
    started_at: float | None = None
    log_size: int = 0
    log_offset: int = 0
    log_chunk: bytes = b""
    metrics_offset: int = 0
    metrics_lines: list[str] = field(default_factory=list)
    # On a Slurm host: the run's job in squeue, or None where squeue no longer shows it (or
    # never did); `slurm_polled` says squeue answered at all.
    slurm: SlurmJob | None = None
    slurm_polled: bool = False
    # slurmstepd's last lines in the job's slurm.out ("" where none): why Slurm killed it.
    slurm_notes: str = ""


def check_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} is not safe as a directory name")
    return run_id


def _bytes(text: str) -> bytes:
    # surrogateescape: a str that carries raw bytes (os.fsdecode) reaches the host as them.
    return text.encode("utf-8", "surrogateescape")


def _no_nul(what: str, text: str) -> str:
    if "\0" in text:
        raise ValueError(f"{what} contains a NUL byte")
    return text


def _run_dir(run_root: str, directory: str) -> str:
    """The run directory as the scripts take it: a leading `~` is the host user's $HOME."""
    return f"{_no_nul('the run root', run_root).rstrip('/')}/{check_run_id(directory)}"


# Parameter objects, one per script. A bash script's values are bytes (any but NUL, except the
# command and the wrapper's, which go to files as they are); poll.py's are JSON.


def launch_params(spec: LaunchSpec) -> dict[str, bytes]:
    """launch.sh: the run directory, the command (command.sh) and the wrapper's parameters."""
    check_run_id(spec.run_id)
    run_env = []
    for name, value in spec.env.items():
        if not ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        run_env.append(f"{name}={_no_nul(f'the value of {name}', str(value))}")
    own = [f"LABSITE_RUN_ID={spec.run_id}"]
    if spec.cuda_visible_devices is not None:
        devices = ",".join(str(int(i)) for i in spec.cuda_visible_devices)
        own += ["CUDA_DEVICE_ORDER=PCI_BUS_ID", f"CUDA_VISIBLE_DEVICES={devices}"]
    # wrapper.sh reads these NUL-terminated fields from its params file (see there why).
    fields = [
        _no_nul("the workdir", spec.workdir),
        _no_nul("env_setup", spec.env_setup),
        str(len(run_env)),
        *run_env,
        *own,
    ]
    return {
        "dir": _bytes(_run_dir(spec.run_root, spec.directory)),
        "command": _bytes(spec.command),
        "wrapper": b"".join(_bytes(f) + b"\0" for f in fields),
    }


def cancel_params(
    run_root: str, run_id: str, grace_seconds: float, dir_name: str = ""
) -> dict[str, bytes]:
    """cancel.sh: the run directory, the run id its processes carry, the grace in 0.1 s steps."""
    check_run_id(run_id)
    return {
        "dir": _bytes(_run_dir(run_root, dir_name or run_id)),
        "run_id": run_id.encode(),
        "steps": str(max(1, int(grace_seconds * 10))).encode(),
    }


def sbatch_params(spec: LaunchSpec, *, job_name: str, conf: str) -> dict[str, bytes]:
    """sbatch.sh: launch.sh's parameters, the job's name, sbatch's options (NUL-terminated
    words) and SLURM_CONF (or empty)."""
    params = launch_params(spec)
    if not re.fullmatch(r"labsite-[A-Za-z0-9_-]{1,64}", job_name):
        raise ValueError(f"{job_name!r} is not a Labsite job name")
    params["name"] = job_name.encode()
    params["args"] = b"".join(
        _bytes(_no_nul("an sbatch option", a)) + b"\0" for a in spec.sbatch_args
    )
    params["conf"] = _bytes(_no_nul("SLURM_CONF", conf))
    return params


def sbatch_array_params(
    specs: list[LaunchSpec], *, job_name: str, conf: str, throttle: int, list_path: str
) -> dict[str, bytes]:
    """sbatch_array.sh: each run's launch parameters (dir_<i>, command_<i>, wrapper_<i>), the
    array's list file, name and throttle, sbatch's other options (the first run's: a sweep's
    runs share them) and SLURM_CONF."""
    if not specs:
        raise ValueError("an array needs runs")
    if not re.fullmatch(r"labsite-array-[A-Za-z0-9_-]{1,64}", job_name):
        raise ValueError(f"{job_name!r} is not a Labsite array name")
    params: dict[str, bytes] = {
        "count": str(len(specs)).encode(),
        "name": job_name.encode(),
        "conf": _bytes(_no_nul("SLURM_CONF", conf)),
        "throttle": str(max(1, int(throttle))).encode(),
        "list": _bytes(_no_nul("the list path", list_path)),
        "args": b"".join(
            _bytes(_no_nul("an sbatch option", a)) + b"\0" for a in specs[0].sbatch_args
        ),
    }
    for i, spec in enumerate(specs):
        for key, value in launch_params(spec).items():
            params[f"{key}_{i}"] = value
    return params


def slurm_detect_params(*, sinfo_format: str, conf: str) -> dict[str, bytes]:
    """slurm_detect.sh: sinfo's output format and SLURM_CONF (or empty)."""
    return {
        "format": sinfo_format.encode(),
        "conf": _bytes(_no_nul("SLURM_CONF", conf)),
    }


def scancel_params(
    run_root: str,
    directory: str,
    *,
    job_name: str,
    conf: str,
    grace_seconds: float,
    job_id: str = "",
) -> dict[str, bytes]:
    """scancel.sh: the run directory, the job's name (or, for an array's element, its id),
    how long to wait, SLURM_CONF."""
    if not re.fullmatch(r"labsite-[A-Za-z0-9_-]{1,64}", job_name):
        raise ValueError(f"{job_name!r} is not a Labsite job name")
    if job_id and not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        raise ValueError(f"{job_id!r} is not a Slurm job id")
    return {
        "dir": _bytes(_run_dir(run_root, directory)),
        "name": job_name.encode(),
        "job": job_id.encode(),
        "steps": str(max(1, int(grace_seconds * 10))).encode(),
        "conf": _bytes(_no_nul("SLURM_CONF", conf)),
    }


def watch_params(run_root: str, heartbeat_seconds: int = 15) -> dict[str, bytes]:
    """watch.sh: the host's events file (beside the run directories) and the heartbeat."""
    events = f"{_no_nul('the run root', run_root).rstrip('/')}/.events"
    return {"events": _bytes(events), "beat": str(max(1, int(heartbeat_seconds))).encode()}


# How far back sacct looks for the jobs that left squeue (a bounded window, not the epoch).
SACCT_WINDOW = "now-30days"


def poll_params(
    refs: list[RunRef],
    *,
    gpu: bool = False,
    slurm_conf: str | None = None,
    accounting: bool = False,
) -> dict[str, Any]:
    """poll.py: every run to report, with the offsets the server has, and whether to ask
    nvidia-smi too; on a Slurm host (`slurm_conf` not None: SLURM_CONF, or empty), squeue once
    for all of them, and with `accounting` one sacct for those of their jobs squeue no longer
    shows."""
    for ref in refs:
        check_run_id(ref.run_id)
        check_run_id(ref.directory)
        if ref.job_id and not re.fullmatch(r"[0-9]+(_[0-9]+)?", ref.job_id):
            raise ValueError(f"{ref.job_id!r} is not a Slurm job id")
    slurm = None
    if slurm_conf is not None:
        slurm = {
            "conf": _no_nul("SLURM_CONF", slurm_conf),
            "sacct": accounting,
            "since": SACCT_WINDOW,
        }
    return {
        "slurm": slurm,
        "runs": [
            {
                "id": r.run_id,
                "dir": r.directory,
                "root": r.run_root,
                "log": r.log_offset,
                "metrics": r.metrics_offset,
                "job": r.job_id,
            }
            for r in refs
        ],
        "max_log": MAX_LOG_CHUNK,
        "max_metrics": MAX_METRICS_CHUNK,
        "gpu": gpu,
        "q_gpu": QUERY_GPU_ARGS,
        "q_apps": QUERY_APPS_ARGS,
    }


# Every byte but printable ASCII, '"', '%' and '\\': what params.sh reads back with printf %b.
_UNSAFE = re.compile(rb"[^\x20\x21\x23\x24\x26-\x5b\x5d-\x7e]")


def _percent(value: bytes) -> str:
    return _UNSAFE.sub(lambda m: b"%%%02X" % m[0][0], value).decode("ascii")


PARAMS_ASSIGNMENT = "LABSITE_PARAMS="


def bash_params_line(params: Mapping[str, bytes]) -> str:
    """The line a bash script gets first: base64 of {"name": "<value, %HH-encoded>"}."""
    for name in params:
        if not PARAM_NAME.match(name):
            raise ValueError(f"{name!r} is not a parameter name")
    # Compact, and its strings hold no '"' or '\\': params.sh splits it on '"' alone.
    text = json.dumps({k: _percent(v) for k, v in params.items()}, separators=(",", ":"))
    return f"{PARAMS_ASSIGNMENT}{base64.b64encode(text.encode()).decode()}\n"


def python_params_line(params: Mapping[str, Any]) -> str:
    """The line poll.py gets first: a string literal of base64 (no quote or backslash in it)."""
    return f'LABSITE_PARAMS = "{base64.b64encode(json.dumps(params).encode()).decode()}"\n'


# Answers.


def _excerpt(text: str) -> str:
    return repr(text.strip()[:200])


def parse_launch(stdout: str) -> int | None:
    """The wrapper's pid, or None when the run was cancelled before it started."""
    for line in stdout.splitlines():
        if line.startswith("LABSITE_PID "):
            pid = line.removeprefix("LABSITE_PID ").strip()
            if not pid.isdigit():
                break
            return int(pid)
        if line.startswith("LABSITE_CANCELLED"):
            return None
        if line.startswith("LABSITE_ERROR"):
            raise ProtocolError(line.removeprefix("LABSITE_ERROR").strip())
    raise ProtocolError(f"unexpected launch answer: {_excerpt(stdout)}")


def parse_calls(stdout: str) -> int:
    """How many Slurm commands a Slurm script said it made (0 where it did not say)."""
    match = re.search(r"^LABSITE_CALLS (\d+)$", stdout, re.MULTILINE)
    return int(match.group(1)) if match else 0


def parse_array(stdout: str, count: int) -> list[str]:
    """sbatch_array.sh's job id for each of its `count` runs, in order ("" for one left out)."""
    jobs: dict[int, str] = {}
    for line in stdout.splitlines():
        if line.startswith("LABSITE_ERROR"):
            raise ProtocolError(line.removeprefix("LABSITE_ERROR").strip())
        # No id: a run stopped while the array was on its way, left out of it.
        match = re.fullmatch(r"LABSITE_RUNJOB (\d+) ?([0-9]+_[0-9]+|[0-9]+)?", line.strip())
        if match:
            jobs[int(match.group(1))] = match.group(2) or ""
    if sorted(jobs) != list(range(count)):
        raise ProtocolError(f"unexpected array answer: {_excerpt(stdout)}")
    return [jobs[i] for i in range(count)]


def parse_submit(stdout: str) -> str | None:
    """sbatch.sh's job id, or None when the run was cancelled before it was submitted."""
    for line in stdout.splitlines():
        if line.startswith("LABSITE_JOB "):
            job = line.removeprefix("LABSITE_JOB ").strip()
            if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
                break
            return job
        if line.startswith("LABSITE_CANCELLED"):
            return None
        if line.startswith("LABSITE_ERROR"):
            raise ProtocolError(line.removeprefix("LABSITE_ERROR").strip())
    raise ProtocolError(f"unexpected submit answer: {_excerpt(stdout)}")


@dataclass(frozen=True)
class SlurmDetection:
    """What slurm_detect.sh saw: sinfo's lines, the version it printed, accounting or not."""

    sinfo: str
    version: str
    accounting: bool


def parse_detect(stdout: str) -> SlurmDetection:
    """slurm_detect.sh's answer; ProtocolError with Slurm's words when sinfo did not answer."""
    sinfo: list[str] = []
    version, accounting = None, None
    for line in stdout.splitlines():
        if line.startswith("LABSITE_ERROR"):
            raise ProtocolError(line.removeprefix("LABSITE_ERROR").strip())
        if line.startswith("LABSITE_SINFO "):
            sinfo.append(line.removeprefix("LABSITE_SINFO "))
        elif line.startswith("LABSITE_VERSION"):
            version = line.removeprefix("LABSITE_VERSION").strip()
        elif line.startswith("LABSITE_ACCOUNTING "):
            accounting = line.removeprefix("LABSITE_ACCOUNTING ").strip() == "1"
    if version is None or accounting is None:
        raise ProtocolError(f"unexpected detect answer: {_excerpt(stdout)}")
    return SlurmDetection("\n".join(sinfo), version, accounting)


def parse_cancel(stdout: str) -> int:
    """How many processes of the run were still there at the end (0 = nothing left)."""
    match = re.search(r"LABSITE_CANCEL term_left=(\d+) left=(\d+)", stdout)
    if not match:
        raise ProtocolError(f"unexpected cancel answer: {_excerpt(stdout)}")
    return int(match.group(2))


def parse_reach(stdout: str) -> list[str]:
    """reach.py's answer: the names of the targets that answered without a password."""
    try:
        data = json.loads(stdout)
    except ValueError as exc:
        raise ProtocolError(f"unexpected reach answer: {_excerpt(stdout)}") from exc
    found = data.get("open") if isinstance(data, dict) else None
    if not isinstance(found, list) or not all(isinstance(name, str) for name in found):
        raise ProtocolError(f"unexpected reach answer: {_excerpt(stdout)}")
    return found


def poll_answer(stdout: str) -> dict[str, Any]:
    """poll.py's JSON answer, checked at the top level (parse_poll and parse_gpu read it)."""
    try:
        data = json.loads(stdout)
    except ValueError as exc:
        raise ProtocolError(f"unexpected poll answer: {_excerpt(stdout)}") from exc
    if (
        not isinstance(data, dict)
        or data.get("ok") != 1
        or not isinstance(data.get("runs"), dict)
        or not isinstance(data.get("gpu"), dict | type(None))
    ):
        raise ProtocolError(f"unexpected poll answer: {_excerpt(stdout)}")
    return data


_MISSING = object()
_INT = (int,)
_OPT_INT = (int, type(None))


def _get(obj: Mapping[str, Any], key: str, kinds: tuple[type, ...], where: str) -> Any:
    """obj[key] when it is one of kinds (bool is not an int here), else ProtocolError."""
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        raise ProtocolError(f"{where}: no {key!r} in {_excerpt(json.dumps(obj))}")
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise ProtocolError(f"{where}: {key!r} is {_excerpt(repr(value))}")
    return value


def _slurm_job(rep: Mapping[str, Any], where: str) -> SlurmJob | None:
    job = rep.get("slurm")
    if job is None:
        return None
    if not isinstance(job, dict):
        raise ProtocolError(f"{where}: slurm is {_excerpt(repr(job))}")
    return SlurmJob(
        job_id=_get(job, "job_id", (str,), where),
        state=_get(job, "state", (str,), where),
        partition=_get(job, "partition", (str,), where),
        nodes=_get(job, "nodes", (str,), where),
        reason=_get(job, "reason", (str,), where),
        exit_code=_get(job, "exit_code", _OPT_INT, where) if "exit_code" in job else None,
        by=_get(job, "by", (str,), where) if "by" in job else "",
        elapsed=_get(job, "elapsed", (str,), where) if "elapsed" in job else "",
    )


def _report(run_id: str, rep: Any, *, slurm_polled: bool = False) -> RunReport:
    where = f"poll answer for run {run_id!r}"
    if not isinstance(rep, dict):
        raise ProtocolError(f"{where}: {_excerpt(repr(rep))}")
    state = _get(rep, "state", (str,), where)
    if state not in RUN_STATES:
        raise ProtocolError(f"{where}: unknown state {_excerpt(state)}")
    lines = _get(rep, "metrics_lines", (list,), where)
    if not all(isinstance(line, str) for line in lines):
        raise ProtocolError(f"{where}: metrics_lines holds a non-string")
    try:
        chunk = base64.b64decode(_get(rep, "log_chunk", (str,), where), validate=True)
    except binascii.Error as exc:
        raise ProtocolError(f"{where}: log_chunk is not base64") from exc
    started = _get(rep, "started_at", (int, float, type(None)), where)
    return RunReport(
        state=state,
        pid=_get(rep, "pid", _OPT_INT, where),
        exit_code=_get(rep, "exit_code", _OPT_INT, where),
        started_at=None if started is None else float(started),
        log_size=_get(rep, "log_size", _INT, where),
        log_offset=_get(rep, "log_offset", _INT, where),
        log_chunk=chunk,
        metrics_offset=_get(rep, "metrics_offset", _INT, where),
        metrics_lines=lines,
        slurm=_slurm_job(rep, where),
        slurm_polled=slurm_polled,
        slurm_notes=_get(rep, "slurm_notes", (str,), where) if "slurm_notes" in rep else "",
    )


def parse_poll(answer: str | Mapping[str, Any]) -> dict[str, RunReport]:
    """Each polled run's report, by run id, from poll.py's answer (raw or from poll_answer)."""
    data = poll_answer(answer) if isinstance(answer, str) else answer
    # On a Slurm host: whether squeue answered (if not, no job's absence means anything).
    polled = data.get("slurm_ok") is True
    return {
        run_id: _report(run_id, rep, slurm_polled=polled) for run_id, rep in data["runs"].items()
    }


def slurm_error(answer: Mapping[str, Any]) -> str:
    """Why squeue did not answer a Slurm host's poll ("" when it did, or was not asked)."""
    error = answer.get("slurm_error", "")
    return error if isinstance(error, str) else repr(error)


def parse_gpu(answer: str | Mapping[str, Any]) -> GpuReport | None:
    """The GPU part of poll.py's answer; None when the poll did not ask for it."""
    data = (poll_answer(answer) if isinstance(answer, str) else answer).get("gpu")
    if data is None:
        return None
    where = "poll answer's gpu"
    pid_runs = _get(data, "pid_runs", (dict,), where)
    if not all(pid.isdigit() and isinstance(run, str) for pid, run in pid_runs.items()):
        raise ProtocolError(f"{where}: pid_runs is {_excerpt(json.dumps(pid_runs))}")
    return GpuReport(
        query_gpu=_get(data, "query_gpu", (str,), where),
        query_apps=_get(data, "query_apps", (str,), where),
        error=_get(data, "error", (str,), where),
        pid_runs={int(pid): run for pid, run in pid_runs.items()},
        cpus=_count(data, "cpus", where),
        memory_mb=_count(data, "memory_mb", where),
    )


def _count(data: Mapping[str, Any], key: str, where: str) -> int | None:
    """A non-negative integer the answer may leave out (or give as 0: not known)."""
    value = data.get(key)
    if value is None or value == 0:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{where}: {key} is {_excerpt(json.dumps(value))}")
    return value
