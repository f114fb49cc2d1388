"""SSH test hosts: one network namespace + one private sshd per host (see TESTING.md).

Plain Python, no pytest.  Needs root, ``/usr/sbin/sshd`` (Debian ``openssh-server``), ``ip``
(``iproute2``) and ``nsenter``/``unshare``/``mount`` (``util-linux``/``mount``, always present).

Layout of one lab (all names carry the owner pid and the lab's subnet octet N, so parallel
sessions and several labs in one session never share anything)::

    root netns:  bridge lb<pid4><N3>  10.231.N.1/24
                   |-- veth v<pid4><N3>h1  <->  eth0 in netns lst<pid4>n<N>h1  10.231.N.11/24
                   |-- veth v<pid4><N3>h2  <->  eth0 in netns lst<pid4>n<N>h2  10.231.N.12/24

Each host has an *anchor* process (``sleep infinity``) started with
``ip netns exec NS unshare --uts --mount --propagation private``; it owns the host's private
UTS namespace (hostname = host name) and mount namespace, in which
``bin_dir`` is bind-mounted over ``/usr/local/bin`` and ``home`` over ``/root``.
sshd (``/usr/sbin/sshd -D -f CONFIG``) and :meth:`SshHost.exec` enter exactly those namespaces
with ``nsenter -t ANCHOR -m -u -n``, so restarting sshd keeps the same view and ``exec`` sees
what an SSH session sees.

SSH sessions run as root with ``HOME=<home>`` (``SetEnv HOME=...``; ``/root`` is the same
directory, bind-mounted) whose ``.bashrc``/``.profile`` are empty, so ``"$HOME"``/``~`` paths
are per host and identical on both sides (the test process can read ``host.home`` directly).
Hosts have no default route: they only reach the lab subnet.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

SSHD = "/usr/sbin/sshd"
SUBNET_PREFIX = "10.231"
_DIR_PREFIX = "labsite-sshlab-"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APT_PACKAGES = ("openssh-server", "iproute2")


# ----------------------------------------------------------------------------- helpers


def _run(
    args: list[str], *, check: bool = True, timeout: float = 30, **kw: Any
) -> subprocess.CompletedProcess:
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}"
        )
    return p


def missing_prerequisites() -> list[str]:
    """Why SSH test hosts cannot run here (empty list: they can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, sshd)")
    if not os.access(SSHD, os.X_OK):
        problems.append(
            f"{SSHD} missing: apt-get install -y --no-install-recommends openssh-server"
        )
    for tool in ("ip", "nsenter", "unshare", "mount"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` not on PATH (iproute2 / util-linux / mount)")
    return problems


def _gen_ed25519(path: Path, comment: str) -> str:
    """Write an OpenSSH-format ed25519 private key (0600) and ``path.pub``; return the pub line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    os.replace(tmp, path)
    line = f"{pub.decode()} {comment}"
    path.with_name(path.name + ".pub").write_text(line + "\n")
    return line


def fingerprint(public_key_line: str) -> str:
    """``SHA256:...`` fingerprint (as ``ssh-keygen -lf`` prints it) of a public key line."""
    return _fingerprint_blob(base64.b64decode(public_key_line.split()[1]))


def _fingerprint_blob(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    """argv joined by spaces (sshd rewrites its title into one string, so match substrings)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_dead(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = [p for p in left if pid_alive(p)]
    return left


def netns_pids(ns: str) -> list[int]:
    p = _run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def netns_list() -> list[str]:
    return [
        line.split()[0]
        for line in _run(["ip", "netns", "list"]).stdout.splitlines()
        if line.strip()
    ]


def link_names() -> list[str]:
    out = _run(["ip", "-o", "link", "show"]).stdout
    return [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, re.M)]


def tcp_answers(ip: str, port: int = 22, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- teardown


def _teardown_state(state: dict[str, Any]) -> list[str]:
    """Remove everything a lab's state records; safe on partial state and to call twice."""
    errors: list[str] = []
    hosts = state.get("hosts", [])
    # 1. sshd listeners, by pid file (only if the pid really is our sshd).
    sshd_pids = []
    for h in hosts:
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(h["pid_file"]).read_text().split()[0])
            if h["config"] in _cmdline(pid):
                _kill(pid, signal.SIGTERM)
                sshd_pids.append(pid)
    for pid in _wait_dead(sshd_pids, 2.0):
        _kill(pid, signal.SIGKILL)
    # 2. everything left in the namespaces (anchor, session sshds, detached runs), then the netns.
    existing_ns = set(netns_list())
    for h in hosts:
        ns = h["ns"]
        if ns not in existing_ns:
            continue
        for _ in range(50):
            pids = netns_pids(ns)
            if not pids:
                break
            for pid in pids:
                _kill(pid, signal.SIGKILL)
            _wait_dead(pids, 1.0)
        else:
            errors.append(f"processes still in {ns}: {netns_pids(ns)}")
        p = _run(["ip", "netns", "del", ns], check=False)
        if p.returncode != 0:
            errors.append(f"ip netns del {ns}: {p.stderr.strip()}")
    # 3. links (deleting the root end of a veth deletes the pair), then the bridge.
    links = set(link_names())
    for name in [h.get("veth_root") for h in hosts] + [state.get("bridge")]:
        if name and name in links:
            p = _run(["ip", "link", "del", name], check=False)
            if p.returncode != 0 and name in link_names():
                errors.append(f"ip link del {name}: {p.stderr.strip()}")
    # 4. files.
    d = state.get("dir")
    if d and Path(d).name.startswith(_DIR_PREFIX):
        shutil.rmtree(d, ignore_errors=True)
    return errors


def cleanup_stale_labs() -> list[str]:
    """Tear down labs left by test processes that died without cleaning up (SIGKILL etc.).

    Only labs whose recorded owner (pid + start time) no longer exists are touched.
    Returns the directories cleaned.
    """
    cleaned = []
    for state_file in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*/state.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        owner, start = state.get("owner_pid"), state.get("owner_starttime")
        if owner is not None and _proc_starttime(owner) == start:
            continue  # owner still alive
        _teardown_state(state)
        cleaned.append(str(state_file.parent))
    return cleaned


# ----------------------------------------------------------------------------- hosts


class SshHost:
    """One test host: its own network namespace, hostname, /usr/local/bin, HOME and sshd."""

    def __init__(self, lab: SshLab, index: int, name: str) -> None:
        self.lab = lab
        self.index = index
        self.name = name
        n = lab.octet
        tag = lab.tag
        self.ns = f"lst{tag}n{n}h{index}"
        self.veth = "eth0"  # name inside the namespace
        self.veth_root = f"v{tag}{n:03d}h{index}"  # <= 15 chars
        self.ip = f"{SUBNET_PREFIX}.{n}.{10 + index}"
        self.port = 22
        self.username = "root"
        self.dir = lab.dir / name
        self.home = str(self.dir / "home")
        self.run_root = f"{self.home}/runs"
        self.bin_dir = str(self.dir / "bin")
        self.config_path = str(self.dir / "sshd_config")
        self.pid_file = str(self.dir / "sshd.pid")
        self.log_path = str(self.dir / "sshd.log")
        self.host_key_path = str(self.dir / "ssh_host_ed25519_key")
        self.host_key_public = ""
        self.host_key_fingerprint = ""
        self.key_path = str(lab.client_key_path)
        self.anchor_pid: int | None = None
        self._anchor: subprocess.Popen | None = None
        self._sshd: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<SshHost {self.name} {self.ip} ns={self.ns}>"

    # -- setup ---------------------------------------------------------------------------

    def _state(self) -> dict[str, str]:
        return {
            "ns": self.ns,
            "veth_root": self.veth_root,
            "pid_file": self.pid_file,
            "config": self.config_path,
        }

    def _prepare_files(self) -> None:
        for d in (self.dir, Path(self.bin_dir), Path(self.home), Path(self.run_root)):
            Path(d).mkdir(parents=True, exist_ok=True)
        for rc in (".bashrc", ".profile", ".bash_profile"):
            (Path(self.home) / rc).write_text("")
        self._new_host_key()
        Path(self.config_path).write_text(
            "\n".join(
                [
                    "Port 22",
                    "AddressFamily inet",
                    f"HostKey {self.host_key_path}",
                    f"PidFile {self.pid_file}",
                    f"AuthorizedKeysFile {self.lab.authorized_keys_path}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "Subsystem sftp internal-sftp",
                    "MaxSessions 10",
                    "MaxStartups 100:30:200",
                    "ClientAliveInterval 5",
                    "UseDNS no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "X11Forwarding no",
                    f"SetEnv HOME={self.home}",
                    "LogLevel INFO",
                    "",
                ]
            )
        )

    def _new_host_key(self) -> None:
        self.host_key_public = _gen_ed25519(Path(self.host_key_path), f"root@{self.name}")
        self.host_key_fingerprint = fingerprint(self.host_key_public)

    def _start_anchor(self) -> None:
        script = (
            "set -e\n"
            f"echo {self.name} > /proc/sys/kernel/hostname\n"
            f"mount --bind {shlex.quote(self.bin_dir)} /usr/local/bin\n"
            f"mount --bind {shlex.quote(self.home)} /root\n"
            "echo ready\n"
            "exec sleep infinity >/dev/null 2>&1\n"
        )
        # ip netns exec and unshare (no --fork) exec in place, so the Popen pid is the anchor.
        self._anchor = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        assert self._anchor.stdout is not None
        line = self._anchor.stdout.readline()
        if line.strip() != "ready":
            err = self._anchor.stderr.read() if self._anchor.poll() is not None else ""  # type: ignore[union-attr]
            raise RuntimeError(f"{self.name}: anchor failed: {line!r} {err.strip()}")
        self._anchor.stdout.close()
        self.anchor_pid = self._anchor.pid

    def _nsenter(self) -> list[str]:
        assert self.anchor_pid is not None, "host not started"
        return ["nsenter", "-t", str(self.anchor_pid), "-m", "-u", "-n"]

    def start_sshd(self, timeout: float = 10.0) -> None:
        """Start sshd in the host's namespaces and wait until it accepts TCP connections."""
        Path(self.pid_file).unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        self._sshd = subprocess.Popen(
            [*self._nsenter(), self.lab.sshd, "-D", "-f", self.config_path, "-E", self.log_path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._sshd.poll() is not None:
                text = Path(self.log_path).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name}: sshd exited {self._sshd.returncode}: {text}")
            if Path(self.pid_file).exists() and tcp_answers(self.ip, self.port):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name}: sshd did not answer on {self.ip}:{self.port} in {timeout}s"
                )
            time.sleep(0.005)

    # -- public API ----------------------------------------------------------------------

    @property
    def sshd_pid(self) -> int | None:
        """pid of the listening sshd (from its pid file), or None."""
        try:
            return int(Path(self.pid_file).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop_sshd(self, timeout: float = 5.0) -> None:
        """Stop the listening sshd by its pid file; sessions and processes it started live on."""
        pid = self.sshd_pid
        if pid is not None and self.config_path in _cmdline(pid):
            _kill(pid, signal.SIGTERM)
            if _wait_dead([pid], timeout):
                _kill(pid, signal.SIGKILL)
        if self._sshd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._sshd.wait(timeout)
            self._sshd = None
        Path(self.pid_file).unlink(missing_ok=True)

    def restart_sshd(self) -> None:
        self.stop_sshd()
        self.start_sshd()

    def exec(
        self, cmd: str, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess:
        """Run ``sh -c cmd`` as root on the host, bypassing SSH.

        Enters the host's net, mount and UTS namespaces (``nsenter -t ANCHOR -m -u -n``), so
        it sees what an SSH session sees (hostname, bin_dir as /usr/local/bin, HOME).  Output
        is captured (text); a command that leaves a background child holding stdout open
        blocks until ``timeout`` -- redirect such children's output.
        """
        env = {
            "HOME": self.home,
            "PATH": _PATH,
            "USER": "root",
            "LOGNAME": "root",
            "SHELL": "/bin/sh",
        }
        p = subprocess.run(
            [*self._nsenter(), f"--wd={self.home}", "sh", "-c", cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"{self.name}: {cmd!r} exited {p.returncode}: {p.stderr.strip()}")
        return p

    def link_down(self) -> None:
        _run(["ip", "-n", self.ns, "link", "set", self.veth, "down"])

    def link_up(self) -> None:
        _run(["ip", "-n", self.ns, "link", "set", self.veth, "up"])

    def rotate_host_key(self) -> str:
        """New host key, sshd restarted; updates ``host_key_public``/``host_key_fingerprint``.

        Returns the old fingerprint.
        """
        old = self.host_key_fingerprint
        self._new_host_key()
        self.restart_sshd()
        return old

    def pids(self) -> list[int]:
        """Every pid in the host's network namespace (anchor, sshd, sessions, detached runs)."""
        return netns_pids(self.ns)

    def write_bin(self, name: str, content: str) -> str:
        """Drop an executable into bin_dir (= /usr/local/bin on the host); returns the host path."""
        p = Path(self.bin_dir) / name
        p.write_text(content)
        p.chmod(0o755)
        return f"/usr/local/bin/{name}"


# ----------------------------------------------------------------------------- lab

_lab_counter = 0


class SshLab:
    """A bridge plus ``n_hosts`` :class:`SshHost`; ``with SshLab(2) as lab: lab.hosts[0]...``."""

    def __init__(
        self, n_hosts: int = 2, *, names: list[str] | None = None, sshd: str = SSHD
    ) -> None:
        if names is None:
            names = [f"lshost{i}" for i in range(1, n_hosts + 1)]
        if not 1 <= len(names) <= 200:
            raise ValueError("1..200 hosts")
        for name in names:
            if not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", name):
                raise ValueError(f"{name!r} is not a usable hostname")
        if len(set(names)) != len(names):
            raise ValueError("host names must differ")
        self.names = list(names)
        self.sshd = sshd
        self.hosts: list[SshHost] = []
        self.tag = f"{os.getpid() % 10000:04d}"
        self.octet = 0
        self.subnet = ""
        self.gateway_ip = ""
        self.bridge = ""
        self.dir = Path()
        self.client_key_path = Path()
        self.client_public_key = ""
        self.authorized_keys_path = Path()
        self.start_seconds: float | None = None
        self._state: dict[str, Any] = {}
        self._closed = False
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> SshLab:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.hosts)

    def __getitem__(self, key: int | str) -> SshHost:
        if isinstance(key, int):
            return self.hosts[key]
        for h in self.hosts:
            if h.name == key:
                return h
        raise KeyError(key)

    def _save_state(self) -> None:
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(self._state))
        os.replace(tmp, self.dir / "state.json")

    def _pick_octet(self) -> int:
        used_text = (
            _run(["ip", "-4", "-o", "addr", "show"]).stdout
            + _run(["ip", "-4", "route", "show", "table", "all"]).stdout
        )
        used = {int(m) for m in re.findall(rf"\b{re.escape(SUBNET_PREFIX)}\.(\d+)\.", used_text)}
        links, nss = set(link_names()), set(netns_list())
        start = (os.getpid() + 37 * _lab_counter) % 250
        for i in range(250):
            n = 3 + (start + i) % 250
            if n in used or f"lb{self.tag}{n:03d}" in links:
                continue
            if any(x.startswith(f"v{self.tag}{n:03d}h") for x in links):
                continue
            if any(x.startswith(f"lst{self.tag}n{n}h") for x in nss):
                continue
            return n
        raise RuntimeError(f"no free {SUBNET_PREFIX}.N.0/24 subnet")

    def start(self) -> SshLab:
        global _lab_counter
        if self._started:
            raise RuntimeError("lab already started")
        problems = missing_prerequisites()
        if problems:
            raise RuntimeError("SSH test hosts unavailable: " + "; ".join(problems))
        self._started = True
        t0 = time.monotonic()
        cleanup_stale_labs()
        self.dir = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX))
        self._state = {
            "owner_pid": os.getpid(),
            "owner_starttime": _proc_starttime(os.getpid()),
            "dir": str(self.dir),
            "hosts": [],
        }
        self._save_state()
        atexit.register(self.close)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _setup(self) -> None:
        global _lab_counter
        self.octet = self._pick_octet()
        _lab_counter += 1
        n = self.octet
        self.subnet = f"{SUBNET_PREFIX}.{n}.0/24"
        self.gateway_ip = f"{SUBNET_PREFIX}.{n}.1"
        self.bridge = f"lb{self.tag}{n:03d}"
        self.client_key_path = self.dir / "client_ed25519"
        self.client_public_key = _gen_ed25519(self.client_key_path, "labsite-tests")
        self.authorized_keys_path = self.dir / "authorized_keys"
        self.authorized_keys_path.write_text(self.client_public_key + "\n")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self.hosts = [SshHost(self, i, name) for i, name in enumerate(self.names, start=1)]
        self._state["bridge"] = self.bridge
        self._state["hosts"] = [h._state() for h in self.hosts]
        self._save_state()

        # Root namespace: bridge, namespaces, veth pairs (one `ip -batch`).
        batch = [
            f"link add {self.bridge} type bridge",
            f"addr add {self.gateway_ip}/24 dev {self.bridge}",
            f"link set {self.bridge} up",
        ]
        for h in self.hosts:
            batch += [
                f"netns add {h.ns}",
                f"link add {h.veth_root} type veth peer name {h.veth} netns {h.ns}",
                f"link set {h.veth_root} master {self.bridge} up",
            ]
        _run(["ip", "-batch", "-"], input="\n".join(batch) + "\n")
        for h in self.hosts:
            _run(
                ["ip", "-n", h.ns, "-batch", "-"],
                input=f"addr add {h.ip}/24 dev {h.veth}\nlink set lo up\nlink set {h.veth} up\n",
            )
            h._prepare_files()
            h._start_anchor()
        for h in self.hosts:
            h.start_sshd()

    def close(self) -> None:
        """Tear everything down (idempotent; fine after a partial start). Raises on leftovers."""
        if self._closed or not self._state:
            self._closed = True
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for h in self.hosts:
            with contextlib.suppress(Exception):
                h.stop_sshd(timeout=2.0)
        errors = _teardown_state(self._state)
        for h in self.hosts:
            for proc in (h._anchor, h._sshd):
                if proc is not None:
                    with contextlib.suppress(Exception):
                        proc.kill()
                        proc.wait(2)
                    for f in (proc.stdout, proc.stderr):
                        if f is not None:
                            f.close()
        if errors:
            raise RuntimeError("SshLab teardown left things behind: " + "; ".join(errors))


# ----------------------------------------------------------------------------- paramiko


def paramiko_connect(
    host: SshHost,
    *,
    timeout: float = 5.0,
    host_key: str | None = None,
    nodelay: bool = True,
):  # -> paramiko.SSHClient
    """Connected ``paramiko.SSHClient`` as ``host.username`` with the harness key.

    The host key is pinned: ``host_key`` (an OpenSSH public key line, default
    ``host.host_key_public``) is the only known key and the policy is RejectPolicy, so a
    different server key raises ``paramiko.BadHostKeyException``; the server key's fingerprint
    is also checked against ``host.host_key_fingerprint`` (or that of ``host_key``).
    ``nodelay`` sets TCP_NODELAY (an exec on an open connection: ~45 ms -> a few ms).
    """
    import paramiko

    key_line = host_key or host.host_key_public
    ktype, b64 = key_line.split()[:2]
    pinned = paramiko.PKey.from_type_string(ktype, base64.b64decode(b64))
    expected_fp = fingerprint(key_line)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    hk_name = host.ip if host.port == 22 else f"[{host.ip}]:{host.port}"
    client.get_host_keys().add(hk_name, ktype, pinned)
    sock = socket.create_connection((host.ip, host.port), timeout=timeout)
    try:
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.connect(
            host.ip,
            port=host.port,
            username=host.username,
            pkey=paramiko.Ed25519Key.from_private_key_file(host.key_path),
            sock=sock,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
        transport = client.get_transport()
        assert transport is not None
        got = transport.get_remote_server_key()
        got_fp = _fingerprint_blob(got.asbytes())
        if got_fp != expected_fp:
            raise paramiko.BadHostKeyException(host.ip, got, pinned)
    except BaseException:
        client.close()
        sock.close()
        raise
    return client


def ssh_run(client: Any, cmd: str, timeout: float = 30) -> tuple[int, str, str]:
    """Run ``cmd`` over an open paramiko client; returns (exit status, stdout, stderr)."""
    _, out, err = client.exec_command(cmd, timeout=timeout)
    o = out.read().decode()
    e = err.read().decode()
    return out.channel.recv_exit_status(), o, e
