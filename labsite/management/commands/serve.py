"""Run web (gunicorn), the Celery worker, Celery beat and the host watcher in the foreground, and
restart any of them that dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

# A child that dies is started again after BACKOFF_FIRST seconds, doubling up to BACKOFF_MAX
# while it keeps dying; one that stayed up STABLE_AFTER seconds starts over at BACKOFF_FIRST.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
STOP_GRACE = 15.0


@dataclass
class Child:
    """One supervised program, in a process group of its own so that it is stopped whole."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, start_new_session=True)
        self.started_at = time.monotonic()
        self.restart_at = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self, now: float) -> str | None:
        """Restart a child that is due; note one that just died. Returns the line to log."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start()
            return None
        if self.proc is None or self.proc.poll() is None:
            if now - self.started_at >= STABLE_AFTER:
                self.backoff = BACKOFF_FIRST
            return None
        # What the dead leader leaves behind (pool processes, gunicorn workers holding the
        # port) would stand in its successor's way; the group is ours, named by its pid.
        _signal_group(self.proc.pid, signal.SIGKILL)
        delay, self.backoff = self.backoff, min(self.backoff * 2, BACKOFF_MAX)
        self.restart_at = now + delay
        return (
            f"{datetime.now():%Y-%m-%d %H:%M:%S} serve: {self.name} (pid {self.proc.pid}) "
            f"{_how_it_ended(self.proc.returncode)}; restarting it in {delay:g} s"
        )


def _how_it_ended(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:  # a real-time signal has no name of its own
        return f"was killed by signal {-returncode}"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class Command(BaseCommand):
    help = (
        "Run site + worker + beat + watcher in the foreground, restarting any that dies; "
        "Ctrl-C stops them all."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=settings.PORT)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        children = [Child(name, argv) for name, argv in _commands(host, port).items()]
        for child in children:
            child.start()
        shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host  # noqa: S104
        self.stdout.write(
            self.style.SUCCESS(f"Labsite is up: http://{shown}:{port}/  (API: /api/docs)")
        )
        self.stdout.write("Press Ctrl-C to stop the site, the worker, beat and the watcher.")
        stopping = False

        def stop(*_: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        while not stopping:
            for child in children:
                line = child.check(time.monotonic())
                if line:
                    self.stderr.write(line)
            time.sleep(0.2)
        _stop_all(children)


def _stop_all(children: list[Child]) -> None:
    running = [c.proc for c in children if c.proc is not None and c.alive()]
    for proc in running:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def _commands(host: str, port: int) -> dict[str, list[str]]:
    bindir = os.path.dirname(sys.executable)
    return {
        "web": [
            os.path.join(bindir, "gunicorn"),
            "labsite.wsgi:application",
            "--bind",
            f"{host}:{port}",
            "--workers",
            os.environ.get("WEB_CONCURRENCY", "3"),
            "--timeout",
            "60",
            "--access-logfile",
            "-",
            # Its default socket (~/.gunicorn/gunicorn.ctl) is one per Unix user: a second
            # Labsite on the machine would take it over and delete it on exit. We supervise
            # gunicorn ourselves and never use gunicornc.
            "--no-control-socket",
        ],
        "worker": [
            os.path.join(bindir, "celery"),
            "-A",
            "labsite",
            "worker",
            "--loglevel=INFO",
            "--concurrency",
            os.environ.get("WORKER_CONCURRENCY", "4"),
        ],
        "beat": [
            os.path.join(bindir, "celery"),
            "-A",
            "labsite",
            "beat",
            "--loglevel=INFO",
            "--schedule",
            settings.CELERY_BEAT_SCHEDULE_FILENAME,
        ],
        "watcher": [sys.executable, str(settings.BASE_DIR / "manage.py"), "watch_hosts"],
    }
