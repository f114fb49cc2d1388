"""How a protocol script reaches a host: what every transport answers, and the local one.

A transport runs a script it is handed on stdin (`bash -s`, `python3 -I -S -`), or a bash
program it is handed for bash's command line with its input on stdin (`bash -c PROGRAM`: the
launch, see scripts/launch.sh), and returns what it printed; for a script that keeps running
(the watcher's), a Stream of its lines. The SSH transport is in ssh.py; this is the server's
own machine, without SSH.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from dataclasses import dataclass
from typing import IO, Any, Protocol

from clusters.localuser import RunUser, clean_environment, python_for


def command_argv(interpreter: str, program: str, python: str = "python3") -> list[str]:
    """The command line of a protocol script (see Transport.run), for every transport."""
    if interpreter == "bash":
        return ["bash", "-c", program] if program else ["bash", "-s"]
    if program:
        raise ValueError("only bash runs a program from its command line")
    # Isolated and without site: a host's PYTHONPATH, PYTHONSTARTUP or a conda env's .pth
    # files can neither change the poll nor slow each one (~30 % of its start).
    return [python, "-I", "-S", "-"]


class TransportError(Exception):
    """The host could not be reached or did not answer in time (nothing is known of its runs)."""


@dataclass(frozen=True)
class Result:
    """What a script left behind: its exit status and its output, decoded leniently."""

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


class Transport(Protocol):
    """Runs one protocol script on a host (see the module docstring)."""

    def run(self, interpreter: str, stdin: str, timeout: float, *, program: str = "") -> Result:
        """`interpreter` ("bash" or "python3") reads `stdin` as its script; or, with a
        `program` (bash only, and nothing secret: a host's process list shows it), runs that
        and reads `stdin` as its input."""
        ...

    def stream(self, script: str, timeout: float) -> Stream: ...


class _LocalStream(Stream):
    def __init__(self, script: str, spawn: dict[str, Any], prefix: list[str]) -> None:
        super().__init__()
        try:
            self.proc = subprocess.Popen(
                [*prefix, "bash", "-s"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                **spawn,
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


class LocalTransport:
    """Runs protocol scripts on the server's own machine, as `user` where there is one.

    Nothing of the server's environment reaches a script (or the runs it starts): it gets
    the few variables of localuser.clean_environment, and the run's own from the launch spec.
    As another user it also gets no supplementary groups; either way it starts in the home dir.
    """

    def __init__(self, user: RunUser | None = None) -> None:
        self.user = user
        env = clean_environment(user)
        # Started in the home directory, as over SSH: never in the server's working directory.
        self.spawn: dict[str, Any] = {"env": env, "close_fds": True, "cwd": env["HOME"]}
        # setpriv (util-linux) changes the user, not subprocess's user=/group=: with those,
        # CPython forks the whole worker instead of vfork-ing it (measured: 8 ms a launch from
        # a worker-sized process against 5 with setpriv's exec). setpriv sets the real,
        # effective and saved ids, so the script keeps no way back to the server's user.
        self.prefix: list[str] = []
        if user is not None:
            self.prefix = [
                "setpriv",
                f"--reuid={user.uid}",
                f"--regid={user.gid}",
                "--clear-groups",
                "--",
            ]

    def run(self, interpreter: str, stdin: str, timeout: float, *, program: str = "") -> Result:
        argv = self.prefix + command_argv(interpreter, program, python_for(self.user))
        try:
            done = subprocess.run(
                argv,
                input=stdin.encode(),
                capture_output=True,
                timeout=timeout,
                check=False,
                **self.spawn,
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
        return _LocalStream(script, self.spawn, self.prefix)
