"""Run web (gunicorn), the Celery worker (with beat inside it) and the host watcher in the
foreground, and restart any of them that dies.

Sized for one lab server by default (labsite/gunicorn.py, labsite/celery.py and the README
say how to size it for a bigger lab): 2 web processes forked from a preloaded master, 2 pool
processes under the worker, beat forked from the worker, the watcher a thread of this process
(an interpreter of its own held 76 MB PSS to follow the hosts' event files)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
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


class WatcherThread:
    """The host watcher (experiments.watcher) as a thread of serve, started again, like a
    child, when it dies."""

    name = "watcher"

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.started_at = 0.0
        self.backoff = BACKOFF_FIRST
        self.restart_at: float | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self.thread.start()
        self.started_at = time.monotonic()
        self.restart_at = None

    def _run(self) -> None:
        from experiments import watcher

        try:
            watcher.watch_forever(self.stopping)
        except Exception:  # noqa: BLE001 - said, then started again by check()
            logging.getLogger(__name__).exception("the watcher stopped")

    def check(self, now: float) -> str | None:
        if self.stopping.is_set():
            return None
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start()
            return None
        if self.thread is None or self.thread.is_alive():
            if now - self.started_at >= STABLE_AFTER:
                self.backoff = BACKOFF_FIRST
            return None
        delay, self.backoff = self.backoff, min(self.backoff * 2, BACKOFF_MAX)
        self.restart_at = now + delay
        stamp = f"{datetime.now():%Y-%m-%d %H:%M:%S}"
        return f"{stamp} serve: the watcher stopped; restarting it in {delay:g} s"

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=STOP_GRACE)


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
        "Run site + worker (with beat) + watcher in the foreground, restarting any that dies; "
        "Ctrl-C stops them all."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=settings.PORT)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        children = [Child(name, argv) for name, argv in _commands(host, port).items()]
        for child in children:
            child.start()
        watching = WatcherThread()
        watching.start()
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
            now = time.monotonic()
            for line in [child.check(now) for child in children] + [watching.check(now)]:
                if line:
                    self.stderr.write(line)
            time.sleep(0.2)
        watching.stop()
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
            os.environ.get("WEB_CONCURRENCY", "2"),
            # Loaded once and forked (labsite/gunicorn.py says what that saves).
            "--preload",
            "--config",
            "python:labsite.gunicorn",
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
            os.environ.get("WORKER_CONCURRENCY", "2"),
            # Beat inside the worker (forked from it, sharing its pages: 85 MB PSS less than a
            # process of its own). One instance runs one worker, so one beat; a lab with
            # workers on several machines runs beat once, on its own (the Procfile's `beat`).
            "-B",
            "--schedule",
            str(settings.CELERY_BEAT_SCHEDULE_FILENAME),
        ],
    }
