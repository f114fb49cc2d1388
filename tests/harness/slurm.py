"""A private single-node Slurm cluster for tests (see TESTING.md, "Single-node Slurm").

Plain Python, no pytest.  Needs root and Debian ``munge`` + ``slurm-wlm`` (Slurm 22.05):
``apt-get install -y munge slurm-wlm``.

Everything lives in one fresh temp dir (0711: munged needs o+x above its socket)::

    <dir>/munge/        0700  munge.key, munged.pid, munged.log, munged.seed
    <dir>/munge-sock/   0755  munge.socket
    <dir>/etc/          slurm.conf, gres.conf
    <dir>/dev/          nvidia0..nvidia3  (character devices ``c 1 3``: fake GPUs)
    <dir>/state, spool, log, run

munged runs with its own key and socket (``AuthInfo=socket=...``), and slurmctld/slurmd use
ports picked free at start, so a machine-wide munge or Slurm is never used or touched.  All
three daemons run in the foreground (``-F``/``-D``) in their own sessions and are stopped by
their pids (process groups) in :meth:`SlurmCluster.close`.

Clients talk to the cluster with ``SLURM_CONF=<conf_path>`` (see :attr:`SlurmCluster.env`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

APT_PACKAGES = ("munge", "slurm-wlm")
ACCOUNTING_PACKAGES = ("slurmdbd", "mariadb-server")
MUNGED = "/usr/sbin/munged"
SLURMDBD = "/usr/sbin/slurmdbd"
MARIADBD = "/usr/sbin/mariadbd"
MARIADB_INSTALL_DB = "/usr/bin/mariadb-install-db"
MUNGEKEY = "/usr/sbin/mungekey"
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_DIR_PREFIX = "labsite-slurm-"

GPU_COUNT = 4
PARTITION = "gpu"
SHORT_PARTITION = "short"
NODE = "localhost"
SPARE_NODE = "spare"  # a second node of the configuration, always drained (spare_node)
MEMORY_MB = 4000  # the node's memory where the cluster enforces it (enforce_memory)


def missing_prerequisites(*, accounting: bool = False) -> list[str]:
    """What this machine lacks to run a SlurmCluster (empty when it can)."""
    problems = []
    if accounting:
        for exe in (SLURMDBD, MARIADBD, MARIADB_INSTALL_DB):
            if not os.access(exe, os.X_OK):
                problems.append(
                    f"{exe} missing (apt-get install -y {' '.join(ACCOUNTING_PACKAGES)})"
                )
    if os.geteuid() != 0:
        problems.append("must run as root (slurmd, mknod)")
    for exe in (MUNGED, SLURMCTLD, SLURMD):
        if not os.access(exe, os.X_OK):
            problems.append(f"{exe} missing (apt-get install -y {' '.join(APT_PACKAGES)})")
    for exe in ("sinfo", "sbatch", "squeue", "scancel"):
        if shutil.which(exe) is None:
            problems.append(f"{exe} not on PATH (apt-get install -y slurm-client)")
    if shutil.which("mknod") is None:
        problems.append("mknod missing (coreutils)")
    return problems


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 right now (held together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path.name}: none)"
    return f"--- {path.name} (last {n} lines) ---\n" + "\n".join(lines[-n:])


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """One slurmctld + one slurmd (node ``localhost``, partitions ``gpu`` and ``short`` (MaxTime
    10 minutes), 4 fake GPUs).

    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        *,
        cpus: int = 2,
        gpus: int = GPU_COUNT,
        start_timeout: float = 30,
        accounting: bool = False,
        min_job_age: int = 3600,
        enforce_memory: bool = False,
        job_requeue: bool = True,
        spare_node: bool = False,
    ) -> None:
        """With `accounting`, a private mariadbd and slurmdbd keep the jobs (sacct answers);
        `min_job_age` is how long squeue still shows a finished job; with `enforce_memory`,
        memory is a consumable resource (the node has MEMORY_MB) and a job over its `--mem` is
        killed (jobacct_gather/linux with OverMemoryKill, sampled every second: this harness
        has no cgroup plugin), ending OUT_OF_MEMORY; without `job_requeue`, Slurm never
        requeues a job itself (JobRequeue=0: a NODE_FAIL is the job's end); with `spare_node`,
        the partitions also hold SPARE_NODE, drained (no slurmd of its own serves it): a job
        that excludes localhost is taken, and waits."""
        self.cpus = cpus
        self.gpus = gpus
        self.accounting = accounting
        self.min_job_age = min_job_age
        self.enforce_memory = enforce_memory
        self.job_requeue = job_requeue
        self.spare_node = spare_node
        self.dbd_port = 0
        self.mariadb_port = 0
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.conf_path: Path | None = None
        self.munge_socket: Path | None = None
        self.ctld_port = 0
        self.slurmd_port = 0
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}

    # ------------------------------------------------------------------ public

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (``sinfo``, ``sbatch``...) aimed at this cluster."""
        assert self.conf_path is not None, "cluster not started"
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    def run(self, *args: str, timeout: float = 15, check: bool = True) -> str:
        """Run a Slurm client command against this cluster; its stdout."""
        p = subprocess.run(
            list(args), capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and p.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def start(self) -> SlurmCluster:
        problems = missing_prerequisites(accounting=self.accounting)
        if problems:
            raise SlurmError("cannot start Slurm: " + "; ".join(problems))
        self.dir = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX))
        atexit.register(self.close)  # a test run that dies between start and close
        try:
            self._write_munge()
            self._start(
                "munged",
                [
                    MUNGED,
                    "--foreground",
                    f"--key-file={self._munge_dir / 'munge.key'}",
                    f"--socket={self.munge_socket}",
                    f"--pid-file={self._munge_dir / 'munged.pid'}",
                    f"--log-file={self._munge_dir / 'munged.log'}",
                    f"--seed-file={self._munge_dir / 'munged.seed'}",
                ],
                self._munge_dir / "munged.log",
            )
            self._wait(
                lambda: self.munge_socket is not None and self.munge_socket.exists(),
                "munged socket",
            )
            self._write_slurm()
            if self.accounting:
                self._start_accounting()
            self._start(
                "slurmctld",
                [SLURMCTLD, "-D", "-i", "-f", str(self.conf_path)],
                self.dir / "log" / "slurmctld.log",
            )
            self._start(
                "slurmd",
                [SLURMD, "-D", "-f", str(self.conf_path), "-N", NODE],
                self.dir / "log" / "slurmd.log",
            )
            self._wait(self._idle, "node localhost idle in sinfo")
        except BaseException:
            with contextlib.suppress(Exception):  # keep the start error, not a cleanup one
                self.close()
            raise
        return self

    def close(self) -> None:
        """Cancel jobs, stop slurmd, slurmctld and munged by pid, remove the temp dir."""
        atexit.unregister(self.close)
        errors: list[str] = []
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                ids = self.run("squeue", "-h", "-o", "%i", timeout=5, check=False)
                ids_list = ids.split()
                if ids_list:
                    self.run("scancel", *ids_list, timeout=5, check=False)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                err = self._stop(name, proc)
                if err:
                    errors.append(err)
        self._logs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if errors:
            raise SlurmError("; ".join(errors))

    def restart_slurmctld(self) -> None:
        """Stop slurmctld by its pid and start it again on the same state (jobs keep running
        on slurmd meanwhile); returns once it answers."""
        assert self.conf_path is not None and self.dir is not None
        proc = self._procs.pop("slurmctld")
        error = self._stop("slurmctld", proc)
        if error:
            raise SlurmError(error)
        self._start(
            "slurmctld",
            [SLURMCTLD, "-D", "-i", "-f", str(self.conf_path)],
            self.dir / "log" / "slurmctld.log",
        )
        self._wait(self._answers, "slurmctld answering again")

    def _answers(self) -> bool:
        try:
            done = subprocess.run(
                ["squeue", "-h"], capture_output=True, env=self.env, timeout=5, check=False
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ setup

    @property
    def _munge_dir(self) -> Path:
        assert self.dir is not None
        return self.dir / "munge"

    def _write_munge(self) -> None:
        assert self.dir is not None
        # munged: "execute permissions for all required" on every directory above its socket.
        os.chmod(self.dir, 0o711)  # noqa: S103
        self._munge_dir.mkdir(mode=0o700)
        os.chmod(self._munge_dir, 0o700)
        sock_dir = self.dir / "munge-sock"
        sock_dir.mkdir()
        os.chmod(sock_dir, 0o755)  # noqa: S103 - munged requires its socket dir to be 0755
        self.munge_socket = sock_dir / "munge.socket"
        key = self._munge_dir / "munge.key"
        if os.access(MUNGEKEY, os.X_OK):
            subprocess.run(
                [MUNGEKEY, "-c", "-k", str(key)], check=True, capture_output=True, timeout=15
            )
        else:
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)

    def _write_slurm(self) -> None:
        assert self.dir is not None and self.munge_socket is not None
        d = self.dir
        for sub in ("etc", "state", "spool", "log", "run", "dev"):
            (d / sub).mkdir(mode=0o755, exist_ok=True)
        for i in range(self.gpus):
            subprocess.run(
                ["mknod", "-m", "666", str(d / "dev" / f"nvidia{i}"), "c", "1", "3"],
                check=True,
                capture_output=True,
                timeout=10,
            )
        self.ctld_port, self.slurmd_port = _free_ports(2)
        self.conf_path = d / "etc" / "slurm.conf"
        nodes = f"{NODE},{SPARE_NODE}" if self.spare_node else NODE
        self.conf_path.write_text(
            "\n".join(
                [
                    f"ClusterName=labsite{os.getpid()}",
                    "SlurmctldHost=localhost(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"SlurmctldPort={self.ctld_port}",
                    f"SlurmdPort={self.slurmd_port}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    *self._memory_lines(),
                    *self._accounting_lines(),
                    "JobCompType=jobcomp/none",
                    "MpiDefault=none",
                    "SelectType=select/cons_tres",
                    "GresTypes=gpu",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=batch_sched_delay=0",
                    # The node's CPUs as configured, not as this machine has them: room for
                    # more jobs at once than its cores (they mostly sleep).
                    "SlurmdParameters=config_overrides",
                    f"MinJobAge={self.min_job_age}",
                    f"JobRequeue={1 if self.job_requeue else 0}",
                    "ReturnToService=2",
                    "SlurmctldTimeout=30",
                    "SlurmdTimeout=60",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={d / 'spool'}",
                    f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
                    f"SlurmdPidFile={d / 'run' / 'slurmd.pid'}",
                    f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    f"PlugStackConfig={d / 'etc' / 'plugstack.conf'}",
                    # Before localhost: Slurm takes any name for a node named localhost while
                    # it is the only one (its lookup), and would call the spare a duplicate.
                    # At 127.0.0.254 (this machine's loopback too) the one slurmd would answer
                    # its pings; drained, it never takes a job.
                    *(
                        [
                            f"NodeName={SPARE_NODE} NodeAddr=127.0.0.254 CPUs={self.cpus} "
                            f"Gres=gpu:{self.gpus} State=DRAIN Reason=spare"
                        ]
                        if self.spare_node
                        else []
                    ),
                    f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                    f"Gres=gpu:{self.gpus} State=UNKNOWN"
                    + (f" RealMemory={MEMORY_MB}" if self.enforce_memory else ""),
                    f"PartitionName={PARTITION} Nodes={nodes} Default=YES MaxTime=INFINITE "
                    "State=UP",
                    # The same node(s) with a time limit: what a run's `time` is checked against.
                    f"PartitionName={SHORT_PARTITION} Nodes={nodes} MaxTime=10 State=UP",
                    "",
                ]
            )
        )
        (d / "etc" / "plugstack.conf").write_text("")
        last = self.gpus - 1
        file_spec = f"nvidia[0-{last}]" if self.gpus > 1 else "nvidia0"
        (d / "etc" / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName={NODE} Name=gpu File={d / 'dev' / file_spec}\n"
        )

    def _memory_lines(self) -> list[str]:
        if not self.enforce_memory:
            return ["JobAcctGatherType=jobacct_gather/none", "SelectTypeParameters=CR_Core"]
        return [
            "JobAcctGatherType=jobacct_gather/linux",
            "JobAcctGatherParams=OverMemoryKill",
            "JobAcctGatherFrequency=task=1",
            "SelectTypeParameters=CR_Core_Memory",
        ]

    def _accounting_lines(self) -> list[str]:
        if not self.accounting:
            return ["AccountingStorageType=accounting_storage/none"]
        self.dbd_port, self.mariadb_port = _free_ports(2)
        # slurmctld exits without AccountingStoragePass when munged's socket is not the default.
        return [
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=localhost",
            f"AccountingStoragePort={self.dbd_port}",
            f"AccountingStoragePass={self.munge_socket}",
        ]

    def _start_accounting(self) -> None:
        """A private mariadbd (its own datadir, port and socket; no grant tables: only this
        test talks to it) and slurmdbd on it, up before slurmctld."""
        assert self.dir is not None and self.munge_socket is not None
        d = self.dir
        data, sock = d / "mariadb", d / "run" / "mariadb.sock"
        data.mkdir()
        subprocess.run(
            [
                MARIADB_INSTALL_DB,
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
            ],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=d,
        )
        self._start(
            "mariadbd",
            [
                MARIADBD,
                "--no-defaults",
                f"--datadir={data}",
                f"--socket={sock}",
                f"--port={self.mariadb_port}",
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-grant-tables",
                f"--pid-file={d / 'run' / 'mariadbd.pid'}",
                f"--log-error={d / 'log' / 'mariadbd.log'}",
            ],
            d / "log" / "mariadbd.log",
        )
        self._wait(lambda: _port_open(self.mariadb_port), "mariadbd listening")
        conf = d / "etc" / "slurmdbd.conf"
        conf.write_text(
            "\n".join(
                [
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    "DbdHost=localhost",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={self.dbd_port}",
                    "SlurmUser=root",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={self.mariadb_port}",
                    "StorageUser=root",
                    "StorageLoc=slurm_acct_db",
                    f"PidFile={d / 'run' / 'slurmdbd.pid'}",
                    f"LogFile={d / 'log' / 'slurmdbd.log'}",
                    "DebugLevel=info",
                    "",
                ]
            )
        )
        os.chmod(conf, 0o600)  # slurmdbd refuses a config others may read
        # slurmdbd reads the slurmdbd.conf beside SLURM_CONF's slurm.conf.
        self._start(
            "slurmdbd",
            [SLURMDBD, "-D"],
            d / "log" / "slurmdbd.log",
            env={"SLURM_CONF": str(self.conf_path)},
        )
        self._wait(lambda: _port_open(self.dbd_port), "slurmdbd listening")

    # ------------------------------------------------------------------ processes

    def _start(
        self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        assert self.dir is not None
        self._logs[name] = log
        out = open(self.dir / f"{name}.stdout", "wb")  # noqa: SIM115 - closed right after spawn
        try:
            self._procs[name] = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": _PATH, "HOME": str(self.dir), "LANG": "C", **(env or {})},
                cwd=self.dir,
            )
        finally:
            out.close()

    def _stop(self, name: str, proc: subprocess.Popen) -> str:
        # Signal the process group (the daemon and anything it spawned, e.g. slurmstepd) while
        # the leader is still unreaped, so its pid (= pgid) cannot have been reused.
        if proc.poll() is not None:
            return ""
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                return ""
            except subprocess.TimeoutExpired:
                continue
        return f"{name} (pid {proc.pid}) did not stop"

    def _diagnostics(self) -> str:
        assert self.dir is not None
        parts = []
        for name, proc in self._procs.items():
            rc = proc.poll()
            parts.append(f"{name}: pid {proc.pid} " + ("running" if rc is None else f"exited {rc}"))
        for name, log in self._logs.items():
            parts.append(_tail(log))
            parts.append(_tail(self.dir / f"{name}.stdout", 10))
        return "\n".join(parts)

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.05
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError(
                        f"{name} exited ({proc.returncode}) while waiting for {what}\n"
                        + self._diagnostics()
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"timed out after {self.start_timeout}s waiting for {what}\n"
                    + self._diagnostics()
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.3)

    def _idle(self) -> bool:
        try:
            out = self.run("sinfo", "-h", "-n", NODE, "-o", "%T", timeout=5, check=False)
        except subprocess.TimeoutExpired:
            return False
        states = out.split()
        return bool(states) and all(s == "idle" for s in states)
