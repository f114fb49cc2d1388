"""Executors launch, poll and cancel processes described by a plain LaunchSpec.

One protocol (protocol.py), several transports: the server itself (subprocess) and SSH hosts
(a pooled paramiko connection). clusters/ never imports experiments/.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Protocol

from clusters.executors import protocol
from clusters.executors.protocol import GpuReport, LaunchSpec, ProtocolError, RunRef, RunReport

__all__ = [
    "Executor",
    "LaunchSpec",
    "LocalTransport",
    "ProtocolError",
    "RunRef",
    "RunReport",
    "Stream",
    "TransportError",
    "executor_for",
]


class TransportError(Exception):
    """The host could not be reached or did not answer in time (nothing is known of its runs)."""


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


class Stream:
    """Lines from a protocol script that keeps running (the watcher's), read with a timeout.

    Closing it closes the script's stdin, which is how the script knows to end.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def _recv(self, timeout: float) -> bytes | None:
        """Some bytes; b"" at the end of the stream; None when nothing came within timeout."""
        raise NotImplementedError

    def readline(self, timeout: float) -> str | None:
        """The next line, or None when none is complete within timeout; the end raises."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            chunk = self._recv(left) if left > 0 else None
            if chunk is None:
                return None
            if not chunk:
                raise TransportError("the host closed the stream")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def close(self) -> None:
        raise NotImplementedError


class _LocalStream(Stream):
    def __init__(self, script: str) -> None:
        super().__init__()
        try:
            self.proc = subprocess.Popen(
                ["bash", "-s"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise TransportError(f"cannot run bash: {exc}") from exc
        self.stdin: IO[bytes] = self.proc.stdin  # type: ignore[assignment]
        self.stdout: IO[bytes] = self.proc.stdout  # type: ignore[assignment]
        self.stdin.write(script.encode())
        self.stdin.flush()

    def _recv(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self.stdout], [], [], timeout)
        return os.read(self.stdout.fileno(), 1 << 16) if ready else None

    def close(self) -> None:
        try:
            self.stdin.close()  # EOF: the script stops its follower and exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()


class Transport(Protocol):
    def run(self, interpreter: str, script: str, timeout: float) -> Result: ...

    def stream(self, script: str, timeout: float) -> Stream: ...


class LocalTransport:
    """Runs protocol scripts on the server itself."""

    def run(self, interpreter: str, script: str, timeout: float) -> Result:
        # The server's own interpreter, isolated: no site-packages or shims to slow each poll.
        argv = ["bash", "-s"] if interpreter == "bash" else [sys.executable, "-I", "-S", "-"]
        try:
            done = subprocess.run(
                argv, input=script.encode(), capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise TransportError(
                f"local {interpreter} did not finish within {timeout:g} s"
            ) from exc
        except OSError as exc:
            raise TransportError(f"cannot run {argv[0]}: {exc}") from exc
        return Result(
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )

    def stream(self, script: str, timeout: float) -> Stream:
        return _LocalStream(script)


class Executor:
    """launch / poll / cancel over one transport."""

    def __init__(
        self, transport: Transport, *, timeout: float = 30.0, poll_timeout: float = 10.0
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        # A poll is small: a host that cannot answer it in this long is flagged unreachable.
        self.poll_timeout = poll_timeout

    def launch(self, spec: LaunchSpec) -> int | None:
        """Start the run detached and return the wrapper's pid (None: cancelled before start)."""
        result = self.transport.run("bash", protocol.launch_script(spec), self.timeout)
        return protocol.parse_launch(result.stdout + "\n" + result.stderr)

    def poll(
        self, refs: list[RunRef], *, gpu: bool = False
    ) -> tuple[dict[str, RunReport], GpuReport | None]:
        """One round trip for every given run on this host (and its GPUs, with gpu=True)."""
        if not refs and not gpu:
            return {}, None
        result = self.transport.run(
            "python3", protocol.poll_script(refs, gpu=gpu), self.poll_timeout
        )
        if result.code != 0:
            raise ProtocolError(f"poll exited {result.code}: {result.stderr.strip()[-300:]}")
        return protocol.parse_poll(result.stdout), protocol.parse_gpu(result.stdout)

    def watch(self, run_root: str, heartbeat_seconds: int = 15) -> Stream:
        """A stream of the run directory names whose command ended, as each ends (see
        protocol.watch_script); lines equal to protocol.WATCH_ALIVE are heartbeats."""
        stream = self.transport.stream(
            protocol.watch_script(run_root, heartbeat_seconds), self.timeout
        )
        try:
            first = stream.readline(self.timeout)
        except TransportError:
            stream.close()
            raise
        if first != protocol.WATCH_READY:
            stream.close()
            raise ProtocolError(f"unexpected watch answer: {first!r}")
        return stream

    def cancel(
        self, *, run_id: str, run_root: str, grace_seconds: float, dir_name: str = ""
    ) -> int:
        """SIGTERM, grace, SIGKILL; returns how many of the run's processes are left (0)."""
        result = self.transport.run(
            "bash",
            protocol.cancel_script(run_root, run_id, grace_seconds, dir_name),
            self.timeout + grace_seconds + 10,
        )
        return protocol.parse_cancel(result.stdout)


def executor_for(host: object) -> Executor:
    """The executor for a Host row (local or ssh)."""
    kind = getattr(host, "kind", "")
    if kind == "local":
        return Executor(LocalTransport())
    if kind == "ssh":
        from clusters.ssh import SshTransport

        name = getattr(host, "name", "?")
        if not getattr(host, "host_key_fingerprint", ""):
            # Nothing is sent to a host whose key is not pinned: only a probe may pin it.
            raise TransportError(f"host {name}: host key not pinned yet")
        if getattr(host, "state", "") == "key_mismatch":
            raise TransportError(f"host {name}: its host key changed; an admin must accept it")
        return Executor(SshTransport.for_host(host))
    raise TransportError(
        f"host {getattr(host, 'name', '?')} of kind {kind!r} cannot run commands yet"
    )
