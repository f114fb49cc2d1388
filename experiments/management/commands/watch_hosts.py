"""Wake a host's poll as soon as a run on it ends (beside the worker; see experiments.watcher)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand

from experiments import watcher


class Command(BaseCommand):
    help = "Follow every enabled host's run-end events and poll a host the moment a run ends."

    def handle(self, *args: Any, **options: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        logging.getLogger("paramiko").setLevel(logging.WARNING)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        self.stdout.write("watching hosts for runs that end (Ctrl-C stops)")
        watcher.watch_forever(stop)
