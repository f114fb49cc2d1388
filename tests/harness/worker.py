"""Real service processes for tests: a Celery worker (with beat) on the test database and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlparse

import redis
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]

# Short timers so tests see polls and passes quickly (the defaults are for a lab).
FAST_TIMERS = {
    "LABSITE_POLL_INTERVAL_SECONDS": "0.5",
    "LABSITE_SCHEDULE_INTERVAL_SECONDS": "1",
    "LABSITE_RECONCILE_INTERVAL_SECONDS": "3",
    "LABSITE_STOP_GRACE_SECONDS": "2",
}


def redis_test_client(url: str | None = None) -> redis.Redis:
    url = url or settings.REDIS_URL
    db = int(urlparse(url).path.lstrip("/") or 0)
    assert db != 0, "tests flush their Redis database: point REDIS_URL at a db other than 0"
    return redis.Redis.from_url(url)


def database_url_for_children() -> str:
    """A URL for the test database pytest-django created, for processes we start."""
    s = connection.settings_dict
    auth = quote(s["USER"] or "")
    if s.get("PASSWORD"):
        auth += ":" + quote(s["PASSWORD"])
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url_for_children(),
        REDIS_URL=settings.REDIS_URL,
        LABSITE_DATA_DIR=str(settings.DATA_DIR),
        LABSITE_LOCAL_TRUST_MEMBERS="true" if settings.LABSITE["LOCAL_TRUST_MEMBERS"] else "false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Stop what we started, by its pid (never by name)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Worker:
    """`celery worker -B` as a process group we own: start, kill -9, start again, stop.

    Beside it, as `manage.py serve` runs them, the host watcher (`manage.py watch_hosts`) in a
    process group of its own; `watcher=False` leaves end detection to the poll ticks alone.
    """

    def __init__(self, log_dir: Path, *, watcher: bool = True, **env: str) -> None:
        self.log_dir = log_dir
        self.env = {**FAST_TIMERS, **env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.watcher = watcher
        self.watcher_proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def watcher_log(self) -> str:
        path = self.log_dir / "watcher.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start_watcher(self) -> None:
        if not self.watcher or (self.watcher_proc and self.watcher_proc.poll() is None):
            return
        with (self.log_dir / "watcher.log").open("ab") as log:
            self.watcher_proc = subprocess.Popen(
                [sys.executable, "manage.py", "watch_hosts"],
                cwd=ROOT,
                env=child_env(**self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def log_text(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log"))
        )

    def start(self, wait: bool = True) -> Worker:
        self.starts += 1
        log = (self.log_dir / f"worker-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "labsite",
                "worker",
                "--loglevel=INFO",
                "--concurrency=4",
                "--without-gossip",
                "--without-mingle",
                "-B",
                "--schedule",
                str(self.log_dir / "beat-schedule"),
                "-n",
                f"test-{os.getpid()}-{self.starts}@%h",
            ],
            cwd=ROOT,
            env=child_env(**self.env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._start_watcher()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        marker = f"test-{os.getpid()}-{self.starts}@"
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_text[-3000:]
            text = (self.log_dir / f"worker-{self.starts}.log").read_text(errors="replace")
            if " ready." in text and marker in text:
                return
            time.sleep(0.1)
        raise AssertionError(
            f"the Celery worker did not come up in {timeout} s:\n{self.log_text[-3000:]}"
        )

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        for proc in (self.proc, self.watcher_proc):
            if proc is not None:
                stop_process_group(proc)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout} s")
