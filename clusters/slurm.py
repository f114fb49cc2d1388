"""Slurm as Labsite speaks it: what sinfo says of a cluster, the options a run may ask and the
sbatch words they become, and Slurm's job states and pending reasons in the lab's words.

Pure functions over text and dicts; the scripts that talk to Slurm are executors/scripts/
(sbatch.sh, scancel.sh, and poll.py's squeue), and experiments decide what a state does to a
run (experiments.runner.slurm).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The per-run `slurm` object of POST /api/runs (and a Slurm host's defaults): these keys only.
OPTION_KEYS = (
    "partition",
    "account",
    "qos",
    "time",
    "cpus_per_gpu",
    "cpus_per_task",
    "mem",
    "mem_per_gpu",
    "constraint",
    "exclude",
    "gpu_type",
    "gpu_option",
)
_INT_KEYS = {"cpus_per_gpu", "cpus_per_task"}
# How a run's GPUs are asked: --gres=gpu[:type]:N (every Slurm), or --gpus=[type:]N where the
# cluster wants it (select/cons_tres sites whose submit filter asks for --gpus).
GPU_OPTIONS = ("gres", "gpus")
_GPU_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_EXCLUSIVE = (("cpus_per_gpu", "cpus_per_task"), ("mem", "mem_per_gpu"))
# What sbatch takes as a word: no spaces, quotes or shell, and never an option of its own.
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,:\[\]+=@-]{0,199}\Z")
_MEM = re.compile(r"[1-9][0-9]{0,9}[KMGT]?\Z")
# A walltime without one: never UNLIMITED, which defeats backfill (SkyPilot #9370).
DEFAULT_TIME_MINUTES = 24 * 60

JOB_NAME_PREFIX = "labsite-"


def job_name(directory: str) -> str:
    """A run's job's name: labsite-<its run directory's name>, which is its id for a first
    attempt and `<id>-a<n>` for a later one (experiments.rundir), so each attempt has its own."""
    return JOB_NAME_PREFIX + directory


def parse_time(text: str) -> int | None:
    """Slurm's time forms (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up;
    None for UNLIMITED / INFINITE. ValueError for anything else."""
    value = text.strip()
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days = 0
    if "-" in value:
        day_text, value = value.split("-", 1)
        if not day_text.isdigit():
            raise ValueError(f"{text!r} is not a Slurm time")
        days = int(day_text)
        parts = value.split(":")
        if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{text!r} is not a Slurm time")
        hours, minutes, seconds = [int(p) for p in parts] + [0] * (3 - len(parts))
    else:
        parts = value.split(":")
        if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{text!r} is not a Slurm time")
        numbers = [int(p) for p in parts]
        if len(numbers) == 1:
            hours, minutes, seconds = 0, numbers[0], 0
        elif len(numbers) == 2:
            hours, (minutes, seconds) = 0, numbers
        else:
            hours, minutes, seconds = numbers
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise ValueError(f"{text!r} is not a walltime: it must be at least a minute")
    return total


def parse_elapsed(text: str) -> int | None:
    """A job's run time as squeue (%M) or sacct (Elapsed) write it: S, M:S, H:M:S, D-H:M:S (and
    sacct's zero-padded forms), in seconds; None for anything else (INVALID, N/A, "")."""
    value = text.strip()
    days = 0
    if "-" in value:
        head, value = value.split("-", 1)
        if not head.isdigit():
            return None
        days = int(head)
    parts = value.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    if days and len(parts) != 3:
        return None
    return days * 86400 + seconds


def format_minutes(minutes: int) -> str:
    days, rest = divmod(minutes, 1440)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


def check_options(options: Any, *, what: str = "slurm") -> dict[str, Any]:
    """The options as given, checked for shape: an object of the known keys, words that sbatch
    takes as they are; ValueError with what is wrong otherwise."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{what} must be an object")
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(
            f"{what}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(OPTION_KEYS)}"
        )
    clean: dict[str, Any] = {}
    for key, value in options.items():
        if key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
                raise ValueError(f"{what}.{key} must be a whole number from 1 to 4096")
        elif not isinstance(value, str) or not _WORD.match(value):
            raise ValueError(f"{what}.{key} must be a plain word such as a partition's name")
        if key == "time":
            if parse_time(value) is None:
                raise ValueError(f"{what}.time must be a walltime, never UNLIMITED")
        if key in ("mem", "mem_per_gpu") and not _MEM.match(value):
            raise ValueError(f"{what}.{key} must be a size such as 16G or 4000M")
        if key == "gpu_option" and value not in GPU_OPTIONS:
            raise ValueError(f"{what}.gpu_option must be one of: {', '.join(GPU_OPTIONS)}")
        if key == "gpu_type" and not _GPU_TYPE.match(value):
            raise ValueError(f"{what}.gpu_type must be a GRES type such as a100")
        clean[key] = value
    for a, b in _EXCLUSIVE:
        if a in clean and b in clean:
            raise ValueError(f"{what}: give {a} or {b}, not both")
    return clean


def merged(defaults: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """A run's options over its host's defaults (a run's cpus_per_task drops a default
    cpus_per_gpu, and likewise for memory)."""
    out = dict(defaults)
    for a, b in _EXCLUSIVE:
        if a in options:
            out.pop(b, None)
        if b in options:
            out.pop(a, None)
    out.update(options)
    return out


def partition_of(options: Mapping[str, Any], facts: Mapping[str, Any]) -> dict[str, Any] | None:
    """The partition the run goes to: the one it names, else the cluster's default."""
    partitions = facts.get("partitions") or []
    name = options.get("partition")
    for part in partitions:
        if (name is None and part.get("default")) or part.get("name") == name:
            return dict(part)
    return None


def check_against(options: Mapping[str, Any], *, gpus: int, facts: Mapping[str, Any]) -> str | None:
    """Why the cluster (as its detection saw it) could never run this, naming what is valid;
    None when it could."""
    partitions = facts.get("partitions") or []
    if not partitions:
        return None  # not detected yet: Slurm itself will say
    part = partition_of(options, facts)
    if part is None:
        names = ", ".join(p["name"] for p in partitions)
        if "partition" in options:
            return f"unknown partition {options['partition']!r}; this cluster has: {names}"
        return f"this cluster has no default partition: name one of {names}"
    kind = options.get("gpu_type")
    types = part.get("gpu_types")
    if gpus and kind and types is not None and kind not in types:
        have = ", ".join(sorted(types)) or "none with a type"
        return f"partition {part['name']} has no GPUs of type {kind!r}; its types: {have}"
    most = int(part.get("max_gpus_per_node") or 0)
    if gpus > most:
        return (
            f"needs {gpus} GPU(s) on one node; the largest node of partition "
            f"{part['name']} has {most}"
        )
    limit = part.get("max_time_minutes")
    if "time" in options and limit is not None:
        asked = parse_time(str(options["time"]))
        if asked is not None and asked > int(limit):
            return (
                f"time {options['time']} is above partition {part['name']}'s MaxTime "
                f"({format_minutes(int(limit))})"
            )
    return None


def sbatch_args(
    options: Mapping[str, Any],
    *,
    gpus: int,
    cpus: int,
    memory_mb: int | None,
    facts: Mapping[str, Any],
) -> list[str]:
    """sbatch's options for a run, each one word (sbatch.sh passes them as they are)."""
    args: list[str] = []
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if key in options:
            args.append(f"--{key}={options[key]}")
    if "time" in options:
        minutes = parse_time(str(options["time"]))
    else:
        part = partition_of(options, facts) or {}
        limit = part.get("max_time_minutes")
        minutes = min(DEFAULT_TIME_MINUTES, int(limit)) if limit else DEFAULT_TIME_MINUTES
    args.append(f"--time={format_minutes(minutes or DEFAULT_TIME_MINUTES)}")
    if gpus:
        kind = options.get("gpu_type")
        if options.get("gpu_option") == "gpus":
            args.append(f"--gpus={kind}:{gpus}" if kind else f"--gpus={gpus}")
        else:
            args.append(f"--gres=gpu:{kind}:{gpus}" if kind else f"--gres=gpu:{gpus}")
    if "cpus_per_gpu" in options and gpus:
        args.append(f"--cpus-per-gpu={options['cpus_per_gpu']}")
    else:
        args.append(f"--cpus-per-task={options.get('cpus_per_task', cpus)}")
    if "mem_per_gpu" in options and gpus:
        args.append(f"--mem-per-gpu={options['mem_per_gpu']}")
    elif "mem" in options:
        args.append(f"--mem={options['mem']}")
    elif memory_mb:
        args.append(f"--mem={memory_mb}M")
    return args


# --- detection ---------------------------------------------------------------------------

# `sinfo -h -N -o` with these fields: one line per node and partition.
SINFO_FORMAT = "%N|%P|%G|%T|%l"


def _gres_gpus(gres: str) -> dict[str, int]:
    """GPUs in a node's GRES by type ("" for none): gpu:4, gpu:a100:8, gpu:a100:8(S:0-1),
    several types side by side."""
    found: dict[str, int] = {}
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            kind = fields[1] if len(fields) >= 3 else ""
            found[kind] = found.get(kind, 0) + int(fields[-1])
    return found


def parse_sinfo(text: str) -> dict[str, Any]:
    """Lines of `sinfo -h -N -o SINFO_FORMAT` as the cluster's summary: partitions with their
    nodes, node states, GPUs (in all, and on the largest node) and MaxTime; and the cluster's
    totals, each node counted once though it may sit in several partitions."""
    partitions: dict[str, dict[str, Any]] = {}
    nodes: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        node, name, gres, state, limit = parts
        default = name.endswith("*")
        name = name.rstrip("*")
        by_type = _gres_gpus(gres)
        gpus = sum(by_type.values())
        state = state.rstrip("*~#!%$@^-")
        try:
            max_time = parse_time(limit)
        except ValueError:
            max_time = None
        part = partitions.setdefault(
            name,
            {
                "name": name,
                "default": default,
                "nodes": 0,
                "gpus": 0,
                "max_gpus_per_node": 0,
                "max_time_minutes": max_time,
                "states": {},
                "gpu_types": [],
            },
        )
        for kind in by_type:
            if kind and kind not in part["gpu_types"]:
                part["gpu_types"].append(kind)
        part["nodes"] += 1
        part["gpus"] += gpus
        part["max_gpus_per_node"] = max(part["max_gpus_per_node"], gpus)
        part["states"][state] = part["states"].get(state, 0) + 1
        nodes[node] = (gpus, state)
    states: dict[str, int] = {}
    for _, state in nodes.values():
        states[state] = states.get(state, 0) + 1
    return {
        "partitions": list(partitions.values()),
        "nodes": len(nodes),
        "gpus": sum(g for g, _ in nodes.values()),
        "node_states": states,
    }


def parse_version(text: str) -> str:
    """`sinfo --version` ("slurm 22.05.8") -> "22.05.8" ("" when it says something else)."""
    match = re.search(r"(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else ""


def detection_facts(sinfo: str, version: str, *, accounting: bool) -> dict[str, Any]:
    """A Slurm host's facts from what its login node said: parse_sinfo's summary, the version
    (parse_version) and whether accounting answers."""
    return parse_sinfo(sinfo) | {"version": parse_version(version), "accounting": accounting}


# --- job states -------------------------------------------------------------------------

WAITING_STATES = frozenset(
    {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
)
RUNNING_STATES = frozenset(
    {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
)


@dataclass(frozen=True)
class Ending:
    """What a terminal Slurm state means for the run: finished, failed or stopped, and why."""

    status: str  # finished | failed | stopped (experiments' words)
    reason: str  # "" | exit_code | timeout | oom | node_fail | cancelled | preempted | ...
    message: str


# slurmstepd's words for a job killed over its memory: jobacct_gather's OverMemoryKill
# ("Exceeded job memory limit"), the cgroup plugin's OOM killer ("Detected 1 oom-kill
# event(s)"). Where they say so, a FAILED or CANCELLED job ran out of host memory.
_MEMORY_KILLED = re.compile(
    r"exceeded (?:job |step )?memory limit|oom-kill event|out-of-memory handler", re.IGNORECASE
)


def memory_note(notes: str) -> str:
    """slurmstepd's line that says the job was killed over its memory ("" when none does)."""
    for line in notes.splitlines():
        if _MEMORY_KILLED.search(line):
            return re.sub(r"^slurmstepd(?:-[^:]*)?:\s*(?:error:\s*)?", "", line.strip())[:300]
    return ""


def ending(
    state: str, *, exit_code: int | None, nodes: str = "", by: str = "", notes: str = ""
) -> Ending | None:
    """The run's end for a terminal Slurm state; None for a state that is not terminal, or
    unknown (never taken as success: the run stays as it is until Slurm says more). `notes`
    are slurmstepd's lines from the job's output: a job they say was killed over its memory
    failed with reason oom, whatever state the cluster's memory plugin left it in."""
    on = f" on {nodes}" if nodes else ""
    memory = memory_note(notes)
    failed = state in ("FAILED", "CANCELLED") or (state == "COMPLETED" and exit_code != 0)
    if memory and failed:
        return Ending("failed", "oom", f"Slurm: {state}, over its memory{on}: {memory}")
    if state == "COMPLETED":
        if exit_code in (0, None):
            return Ending("finished", "", "Slurm: COMPLETED")
        return Ending("failed", "exit_code", f"Slurm: COMPLETED, exit code {exit_code}")
    if state == "FAILED":
        return Ending("failed", "exit_code", f"Slurm: FAILED (exit code {exit_code}){on}")
    if state == "CANCELLED":
        return Ending("stopped", "cancelled", f"Slurm: CANCELLED{f' by {by}' if by else ''}")
    if state == "TIMEOUT":
        return Ending("failed", "timeout", f"Slurm: TIMEOUT, the job reached its time limit{on}")
    if state == "OUT_OF_MEMORY":
        return Ending("failed", "oom", f"Slurm: OUT_OF_MEMORY (host memory){on}")
    if state in ("NODE_FAIL", "BOOT_FAIL"):
        return Ending("failed", "node_fail", f"Slurm: {state}{on or ' (node unknown)'}")
    if state == "DEADLINE":
        return Ending("failed", "deadline", "Slurm: DEADLINE, it could not start in time")
    if state == "PREEMPTED":
        return Ending("failed", "preempted", f"Slurm: PREEMPTED{on}")
    if state == "SPECIAL_EXIT":
        return Ending("failed", "exit_code", f"Slurm: SPECIAL_EXIT (exit code {exit_code})")
    return None


_REASONS = {
    "None": "submitted; Slurm's scheduler has not looked at it yet",
    "Resources": "waiting for resources",
    "Priority": "waiting behind jobs of higher priority",
    "Dependency": "waiting for a job it depends on",
    "BeginTime": "waiting for its begin time",
    "JobHeldUser": "held by its user",
    "JobHeldAdmin": "held by an admin",
    "ReqNodeNotAvail": "a node it asks is not available",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "PartitionTimeLimit": "its time is above the partition's limit",
    "PartitionNodeLimit": "it asks more nodes than the partition allows",
    "Reservation": "waiting for a reservation",
    "AssocGrpGRES": "the account's GPU limit",
    "AssocMaxJobsLimit": "the account's job limit",
    "NodeDown": "a node it needs is down",
    "BadConstraints": "no node matches its constraints",
    "Licenses": "waiting for licenses",
    "Cleaning": "being cleaned up after a requeue",
}


def pending_words(reason: str, partition: str = "") -> str:
    """squeue's %r for a pending job in words: "Slurm: waiting for resources (partition gpu)"."""
    reason = reason.strip().strip("()")
    # "ReqNodeNotAvail, UnavailableNodes:n3": the reason, then Slurm's detail.
    reason, _, detail = reason.partition(",")
    detail = detail.strip()
    if reason.startswith("QOS"):
        words = f"a QOS limit ({reason})"
    elif reason.startswith("Assoc") and reason not in _REASONS:
        words = f"an account limit ({reason})"
    else:
        words = _REASONS.get(reason, reason or "pending")
    if detail:
        words += f" ({detail})"
    where = f" (partition {partition})" if partition else ""
    return f"Slurm: {words}{where}"[:500]
