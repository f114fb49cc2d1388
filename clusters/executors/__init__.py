"""Executors launch, poll, watch and cancel processes described by a plain LaunchSpec.

One protocol (protocol.py: parameters and parsers; scripts/: the remote side as files), two
transports: the server's own machine (transport.py) and SSH hosts (ssh.py, the paramiko
pool). Callers outside this package import from here only. A LaunchSpec knows nothing of
plans, sweeps or users.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

from clusters.choices import HostKind, HostState
from clusters.executors import protocol
from clusters.executors.protocol import (
    WATCH_ALIVE,
    WATCH_READY,
    GpuReport,
    LaunchSpec,
    ProtocolError,
    RunRef,
    RunReport,
    SlurmJob,
)
from clusters.executors.ssh import HostKeyMismatch, SshTransport, Target, probe
from clusters.executors.transport import (
    LocalTransport,
    Result,
    Stream,
    Transport,
    TransportError,
)
from clusters.localuser import run_user
from clusters.slurm import SINFO_FORMAT, detection_facts, job_name

if TYPE_CHECKING:
    from clusters.models import Host

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "WATCH_ALIVE",
    "Executor",
    "GpuReport",
    "HostKeyMismatch",
    "LaunchSpec",
    "LocalTransport",
    "ProtocolError",
    "Result",
    "RunRef",
    "RunReport",
    "SlurmExecutor",
    "SlurmJob",
    "SshTransport",
    "Stream",
    "Target",
    "Transport",
    "TransportError",
    "bash_script",
    "executor_for",
    "launch_input",
    "launch_program",
    "probe",
    "python_script",
    "source",
]


@cache
def source(name: str) -> str:
    """The text of scripts/<name>, as shipped (package data)."""
    return (resources.files(__name__) / "scripts" / name).read_text(encoding="utf-8")


COMMENT = re.compile(r"[ \t]*#")


@cache
def parsed_by_bash(name: str) -> str:
    """scripts/<name> without its comment lines, for `bash -s`: bash reads a script from a pipe
    one byte at a time (one read(2) each), and the comments are half of every script (measured:
    2.8 ms of a launch's exec). The scripts have no here-documents or multi-line strings (a test
    checks), so a line whose first non-blank is `#` is a comment."""
    kept = [line for line in source(name).splitlines(keepends=True) if not COMMENT.match(line)]
    return "".join(kept)


def bash_script(name: str, params: Mapping[str, bytes]) -> str:
    """What goes to `bash -s` for scripts/<name>: the parameters' line, params.sh (which reads
    it), then the script; only the first line depends on the parameters."""
    return protocol.bash_params_line(params) + parsed_by_bash("params.sh") + parsed_by_bash(name)


def python_script(name: str, params: Mapping[str, Any]) -> str:
    """What goes to `python3 -I -S -` for scripts/<name>: the parameters' line, the script."""
    return protocol.python_params_line(params) + source(name)


@cache
def launch_program() -> str:
    """What `bash -c` runs for a launch: params.sh and launch.sh, the same for every run."""
    return parsed_by_bash("params.sh") + parsed_by_bash("launch.sh")


def launch_input(spec: LaunchSpec) -> str:
    """A launch's stdin: its parameters (see scripts/launch.sh), wrapper.sh among them."""
    return stdin_with_wrapper(protocol.launch_params(spec))


def stdin_with_wrapper(params: Mapping[str, bytes]) -> str:
    """The whole stdin of a script that starts runs (launch.sh, sbatch.sh, sbatch_array.sh):
    its parameters' base64, with wrapper.sh as `wrapper_script`."""
    params = {**params, "wrapper_script": source("wrapper.sh").encode()}
    return protocol.bash_params_line(params).removeprefix(protocol.PARAMS_ASSIGNMENT)


class Executor:
    """launch / poll / watch / cancel over one transport."""

    def __init__(
        self, transport: Transport, *, timeout: float = 30.0, poll_timeout: float = 10.0
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        # A poll is small: a host that cannot answer it in this long is flagged unreachable.
        self.poll_timeout = poll_timeout

    def launch(self, spec: LaunchSpec) -> int | None:
        """Start the run detached and return the wrapper's pid (None: cancelled before start)."""
        result = self.transport.run(
            "bash", launch_input(spec), self.timeout, program=launch_program()
        )
        return protocol.parse_launch(result.stdout + "\n" + result.stderr)

    def poll(
        self, refs: list[RunRef], *, gpu: bool = False
    ) -> tuple[dict[str, RunReport], GpuReport | None]:
        """One round trip for every given run on this host (and its GPUs, with gpu=True)."""
        if not refs and not gpu:
            return {}, None
        text = python_script("poll.py", protocol.poll_params(refs, gpu=gpu))
        result = self.transport.run("python3", text, self.poll_timeout)
        if result.code != 0:
            raise ProtocolError(f"poll exited {result.code}: {result.stderr.strip()[-300:]}")
        answer = protocol.poll_answer(result.stdout)
        return protocol.parse_poll(answer), protocol.parse_gpu(answer)

    def watch(self, run_root: str, heartbeat_seconds: int = 15) -> Stream:
        """A stream of the run directory names whose command ended, as each ends (see
        scripts/watch.sh); lines equal to WATCH_ALIVE are heartbeats."""
        text = bash_script("watch.sh", protocol.watch_params(run_root, heartbeat_seconds))
        stream = self.transport.stream(text, self.timeout)
        try:
            first = stream.readline(self.timeout)
        except TransportError:
            stream.close()
            raise
        if first != WATCH_READY:
            stream.close()
            raise ProtocolError(f"unexpected watch answer: {first!r}")
        return stream

    def reach(self, targets: list[dict[str, object]]) -> list[str]:
        """Which of these services answer this transport's user without a password (see
        scripts/reach.py): the names of those that do."""
        result = self.transport.run(
            "python3", python_script("reach.py", {"targets": targets}), self.timeout
        )
        if result.code != 0:
            raise ProtocolError(f"reach exited {result.code}: {result.stderr.strip()[-300:]}")
        return protocol.parse_reach(result.stdout)

    def cancel(
        self, *, run_id: str, run_root: str, grace_seconds: float, dir_name: str = ""
    ) -> int:
        """SIGTERM, grace, SIGKILL; returns how many of the run's processes are left (0)."""
        params = protocol.cancel_params(run_root, run_id, grace_seconds, dir_name)
        result = self.transport.run(
            "bash", bash_script("cancel.sh", params), self.timeout + grace_seconds + 10
        )
        return protocol.parse_cancel(result.stdout)


@cache
def sbatch_program() -> str:
    """What `bash -c` runs for a Slurm submission: params.sh and sbatch.sh."""
    return parsed_by_bash("params.sh") + parsed_by_bash("sbatch.sh")


@cache
def sbatch_array_program() -> str:
    """What `bash -c` runs for a job array: params.sh and sbatch_array.sh."""
    return parsed_by_bash("params.sh") + parsed_by_bash("sbatch_array.sh")


# sbatch's words for a cluster that is there but cannot take the job right now: the dispatch
# is retried (TransportError), not failed.
_SLURM_BUSY = re.compile(
    r"squeue:|Unable to contact slurm controller|Socket timed out|temporarily unable|"
    r"Slurm controller not responding|Zero Bytes were transmitted|job submit limit|MaxSubmit",
    re.IGNORECASE,
)


class SlurmExecutor(Executor):
    """A Slurm cluster's login node: runs become jobs (sbatch.sh), one squeue per poll covers
    all of them (poll.py), a stop is an scancel (scancel.sh). `conf` is the SLURM_CONF its
    client commands use ("" for the node's own)."""

    def __init__(
        self, transport: Transport, *, conf: str = "", accounting: bool = False, **kw: Any
    ) -> None:
        super().__init__(transport, **kw)
        self.conf = conf
        self.accounting = accounting
        self.calls = 0  # Slurm commands made so far (squeue, sacct, sbatch, scancel)

    def submit(self, spec: LaunchSpec) -> str | None:
        """Submit the run as a job, once; its job id (None: cancelled before it was)."""
        # Named after its run directory: a later attempt's job is never taken for an earlier's.
        params = protocol.sbatch_params(spec, job_name=job_name(spec.directory), conf=self.conf)
        answer = self._submission(sbatch_program(), params, self.timeout)
        return self._busy_is_transient(protocol.parse_submit, answer)

    def submit_array(
        self, specs: list[LaunchSpec], *, job_name: str, throttle: int, list_path: str
    ) -> list[str]:
        """Submit these runs as one job array (once: see scripts/sbatch_array.sh); the job id
        of each (`<array>_<k>`), in order."""
        params = protocol.sbatch_array_params(
            specs, job_name=job_name, conf=self.conf, throttle=throttle, list_path=list_path
        )
        timeout = self.timeout + len(specs) * 0.05
        answer = self._submission(sbatch_array_program(), params, timeout)
        return self._busy_is_transient(lambda text: protocol.parse_array(text, len(specs)), answer)

    def _submission(self, program: str, params: Mapping[str, bytes], timeout: float) -> str:
        """Run a submitting script (its answer, stdout then stderr), counting its Slurm calls."""
        result = self.transport.run("bash", stdin_with_wrapper(params), timeout, program=program)
        self.calls += protocol.parse_calls(result.stdout)
        return result.stdout + "\n" + result.stderr

    @staticmethod
    def _busy_is_transient(parse: Callable[[str], T], answer: str) -> T:
        """The parsed answer; Slurm's "not now" (a controller away, a submit limit) is a
        TransportError, retried, rather than a refusal that fails the run."""
        try:
            return parse(answer)
        except ProtocolError as exc:
            if _SLURM_BUSY.search(str(exc)):
                raise TransportError(f"Slurm did not take it now: {exc}") from exc
            raise

    def detect(self) -> dict[str, Any]:
        """The cluster as this login node's Slurm sees it, in one round trip (sinfo, its
        version, whether sacct answers): clusters.slurm.detection_facts. ProtocolError with
        Slurm's words when sinfo does not answer."""
        params = protocol.slurm_detect_params(sinfo_format=SINFO_FORMAT, conf=self.conf)
        result = self.transport.run("bash", bash_script("slurm_detect.sh", params), self.timeout)
        self.calls += protocol.parse_calls(result.stdout)
        seen = protocol.parse_detect(result.stdout + "\n" + result.stderr)
        return detection_facts(seen.sinfo, seen.version, accounting=seen.accounting)

    def launch(self, spec: LaunchSpec) -> int | None:
        raise ProtocolError("a Slurm run is submitted (submit), not launched")

    def poll(
        self, refs: list[RunRef], *, gpu: bool = False
    ) -> tuple[dict[str, RunReport], GpuReport | None]:
        """One round trip: every run's directory and one squeue for all their jobs."""
        if not refs:
            return {}, None
        params = protocol.poll_params(refs, slurm_conf=self.conf, accounting=self.accounting)
        text = python_script("poll.py", params)
        result = self.transport.run("python3", text, self.poll_timeout + 20)
        if result.code != 0:
            raise ProtocolError(f"poll exited {result.code}: {result.stderr.strip()[-300:]}")
        answer = protocol.poll_answer(result.stdout)
        calls = answer.get("slurm_calls")
        self.calls += calls if isinstance(calls, int) and not isinstance(calls, bool) else 0
        if error := protocol.slurm_error(answer):
            log.warning("squeue did not answer: %s", error)
        return protocol.parse_poll(answer), None

    def cancel(
        self,
        *,
        run_id: str,
        run_root: str,
        grace_seconds: float,
        dir_name: str = "",
        job_id: str = "",
    ) -> int:
        """scancel the run's job (by name: a job whose id was never recorded too; an array's
        element by its id); how many of its jobs Slurm still holds (0: gone)."""
        params = protocol.scancel_params(
            run_root,
            dir_name or run_id,
            job_name=job_name(dir_name or run_id),
            conf=self.conf,
            grace_seconds=max(grace_seconds, 5.0),
            job_id=job_id,
        )
        result = self.transport.run(
            "bash", bash_script("scancel.sh", params), self.timeout + grace_seconds + 10
        )
        self.calls += protocol.parse_calls(result.stdout)
        if "LABSITE_ERROR" in result.stdout:
            # Slurm did not answer: nothing is known of the job, so it is not "gone".
            raise TransportError(f"Slurm did not confirm the cancel: {result.stdout.strip()}")
        return protocol.parse_cancel(result.stdout)


def executor_for(host: Host) -> Executor:
    """The executor for a Host row: local, ssh, or a Slurm cluster (its login node: this
    machine when the host's hostname is localhost, else reached over SSH like an ssh host)."""
    if host.kind == HostKind.SLURM:
        facts = host.facts or {}
        conf = str(facts.get("slurm_conf") or "")
        accounting = bool(facts.get("accounting"))
        if host.hostname in ("", "localhost"):
            return SlurmExecutor(LocalTransport(run_user()), conf=conf, accounting=accounting)
        _check_pinned(host)
        return SlurmExecutor(SshTransport.for_host(host), conf=conf, accounting=accounting)
    if host.kind == HostKind.LOCAL:
        return Executor(LocalTransport(run_user()))
    if host.kind == HostKind.SSH:
        _check_pinned(host)
        return Executor(SshTransport.for_host(host))
    raise TransportError(f"host {host.name} of kind {host.kind!r} cannot run commands yet")


def _check_pinned(host: Host) -> None:
    if not host.host_key_fingerprint:
        # Nothing is sent to a host whose key is not pinned: only a probe may pin it.
        raise TransportError(f"host {host.name}: host key not pinned yet")
    if host.state == HostState.KEY_MISMATCH:
        raise TransportError(f"host {host.name}: its host key changed; an admin must accept it")
