"""The SSH transport: one pooled paramiko connection per host per worker process, with
pinned host keys.

Keepalives, TCP_NODELAY, a timeout on every operation, reconnect with backoff, and fewer
concurrent channels than sshd's MaxSessions (10 by default).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import paramiko

from clusters.executors.transport import Result, Stream, TransportError, command_argv

log = logging.getLogger(__name__)
# What a broken or refused SSH connection raises (paramiko, the socket, a closed transport).
_IO_ERRORS = (OSError, paramiko.SSHException, EOFError)


def _failed(name: str, exc: BaseException) -> TransportError:
    return TransportError(f"{name}: {type(exc).__name__}: {exc}")


MAX_CHANNELS = 8
CONNECT_TIMEOUT = 10.0
KEEPALIVE_SECONDS = 15
# A pooled connection is replaced after this long, so its host key is checked again.
MAX_CONNECTION_AGE = 600.0


class HostKeyMismatch(TransportError):
    """The host presented a key other than the pinned one: nothing is sent to it."""

    def __init__(self, host: str, expected: str, got: str) -> None:
        super().__init__(f"host key of {host} changed: pinned {expected}, presented {got}")
        self.expected = expected
        self.got = got


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 form: SHA256:<base64 without padding>."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _PinnedKeyPolicy(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]  # paramiko ships no types
    """Accept exactly the pinned fingerprint; with none pinned (first contact) record it."""

    def __init__(self, name: str, pinned: str) -> None:
        self.name = name
        self.pinned = pinned
        self.seen: str | None = None

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        self.seen = fingerprint(key)
        if self.pinned and self.seen != self.pinned:
            raise HostKeyMismatch(self.name, self.pinned, self.seen)


@dataclass(frozen=True)
class Target:
    name: str
    hostname: str
    port: int
    username: str
    identity_file: str
    fingerprint: str


class _Connection:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.client: paramiko.SSHClient | None = None
        self.lock = threading.Lock()
        self.channels = threading.BoundedSemaphore(MAX_CHANNELS)
        self.failures = 0
        self.retry_at = 0.0
        self.opened_at = 0.0

    def transport(self) -> paramiko.Transport:
        with self.lock:
            if self.client is not None:
                t = self.client.get_transport()
                fresh = time.monotonic() - self.opened_at < MAX_CONNECTION_AGE
                if t is not None and t.is_active() and fresh:
                    return t
                self.client.close()
                self.client = None
            now = time.monotonic()
            if now < self.retry_at:
                raise TransportError(
                    f"{self.target.name}: unreachable, next try in {self.retry_at - now:.1f} s"
                )
            try:
                self.client, _ = connect(self.target)
                self.failures = 0
                self.opened_at = time.monotonic()
            except HostKeyMismatch:
                raise
            except _IO_ERRORS as exc:
                self.failures += 1
                self.retry_at = now + min(30.0, 0.5 * 2 ** min(self.failures, 6))
                raise TransportError(f"{self.target.name}: cannot connect: {exc}") from exc
            t = self.client.get_transport()
            assert t is not None
            return t

    def drop(self) -> None:
        with self.lock:
            if self.client is not None:
                self.client.close()
                self.client = None


def connect(target: Target, *, timeout: float = CONNECT_TIMEOUT) -> tuple[paramiko.SSHClient, str]:
    """A new connection with the key pinned (or, with none pinned, the key it presented)."""
    client = paramiko.SSHClient()
    policy = _PinnedKeyPolicy(target.name, target.fingerprint)
    client.set_missing_host_key_policy(policy)
    try:
        client.connect(
            target.hostname,
            port=target.port,
            username=target.username or None,
            key_filename=os.path.expanduser(target.identity_file) if target.identity_file else None,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            look_for_keys=not target.identity_file,
            allow_agent=False,
        )
    except BaseException:
        client.close()
        raise
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(KEEPALIVE_SECONDS)
    sock = transport.sock
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, policy.seen or target.fingerprint


_pool: dict[tuple[int, Target], _Connection] = {}
_pool_lock = threading.Lock()


def _connection(target: Target) -> _Connection:
    # Keyed by pid too: a forked Celery child must never reuse its parent's socket.
    key = (os.getpid(), target)
    with _pool_lock:
        conn = _pool.get(key)
        if conn is None:
            conn = _pool[key] = _Connection(target)
        return conn


def probe(target: Target, *, timeout: float = CONNECT_TIMEOUT) -> str:
    """Connect once (not pooled) and return the host key's fingerprint; raises on mismatch."""
    client, seen = connect(target, timeout=timeout)
    client.close()
    return seen


class SshTransport:
    """Runs protocol scripts over the host's pooled connection, one channel per script."""

    def __init__(self, target: Target) -> None:
        self.target = target

    @classmethod
    def for_host(cls, host: Any) -> SshTransport:
        return cls(
            Target(
                name=host.name,
                hostname=host.hostname,
                port=host.port or 22,
                username=host.username,
                identity_file=host.identity_file,
                fingerprint=host.host_key_fingerprint,
            )
        )

    def run(self, interpreter: str, stdin: str, timeout: float, *, program: str = "") -> Result:
        # The user's login shell (any POSIX shell) takes the command line apart again.
        command = shlex.join(command_argv(interpreter, program))
        conn = self._slot(timeout)
        try:
            channel = self._start(conn, command, stdin, timeout)
            try:
                channel.shutdown_write()
                stdout, stderr = _drain(channel, timeout)
                code = channel.recv_exit_status()
                channel.close()
            except _IO_ERRORS as exc:
                conn.drop()
                raise _failed(self.target.name, exc) from exc
        finally:
            conn.channels.release()
        return Result(code, stdout.decode(errors="replace"), stderr.decode(errors="replace"))

    def stream(self, script: str, timeout: float) -> Stream:
        """A long-running bash script on its own channel; stdin stays open until close()."""
        conn = self._slot(timeout)
        try:
            channel = self._start(conn, "bash -s", script, timeout)
        except BaseException:
            conn.channels.release()
            raise
        return _SshStream(self.target.name, conn, channel)

    def _slot(self, timeout: float) -> _Connection:
        """The host's pooled connection, with one of its channel slots held for the caller."""
        conn = _connection(self.target)
        if not conn.channels.acquire(timeout=timeout):
            raise TransportError(f"{self.target.name}: no free SSH channel within {timeout:g} s")
        return conn

    def _start(
        self, conn: _Connection, command: str, script: str, timeout: float
    ) -> paramiko.Channel:
        """A channel running `command` with `script` sent on its stdin; a broken connection
        is dropped from the pool (the next call reconnects)."""
        try:
            channel = conn.transport().open_session(timeout=timeout)
            channel.settimeout(timeout)
            channel.exec_command(command)
            channel.sendall(script.encode())
        except _IO_ERRORS as exc:
            conn.drop()
            raise _failed(self.target.name, exc) from exc
        return channel


class _SshStream(Stream):
    def __init__(self, name: str, conn: _Connection, channel: paramiko.Channel) -> None:
        super().__init__()
        self.name, self.conn, self.channel = name, conn, channel
        self.closed = False

    def _recv(self, timeout: float) -> bytes | None:
        self.channel.settimeout(timeout)
        try:
            return bytes(self.channel.recv(1 << 16))
        except TimeoutError:
            return None
        except _IO_ERRORS as exc:
            raise _failed(self.name, exc) from exc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.channel.close()  # the script reads EOF and ends its follower
            self.conn.channels.release()


def _drain(channel: paramiko.Channel, timeout: float) -> tuple[bytes, bytes]:
    """stdout to EOF, then stderr (protocol scripts keep stderr small, so no window stalls)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer within {timeout:g} s")
        chunk = channel.recv(1 << 16)
        if not chunk:
            break
        out += chunk
    err = bytearray()
    while channel.recv_stderr_ready() or not channel.exit_status_ready():
        chunk = channel.recv_stderr(1 << 16)
        if not chunk:
            break
        err += chunk
    return bytes(out), bytes(err)
