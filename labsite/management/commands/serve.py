"""Run web (gunicorn), the Celery worker, Celery beat and the host watcher in the foreground."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Run site + worker + beat + watcher in the foreground; Ctrl-C stops them all."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=settings.PORT)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        bindir = os.path.dirname(sys.executable)
        commands = {
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
        procs = {
            name: subprocess.Popen(cmd, start_new_session=True) for name, cmd in commands.items()
        }
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
        exit_code = 0
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    self.stderr.write(f"{name} exited with {proc.returncode}; stopping the rest")
                    exit_code = proc.returncode or 1
                    stopping = True
            time.sleep(0.5)
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        sys.exit(exit_code)
