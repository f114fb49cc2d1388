"""Wake the poll of a host the moment a run on it ends, not at the next tick.

Each run's wrapper appends its directory name to the host's events file when its command ends
(clusters/executors/scripts). The watcher holds one stream per enabled host (Executor.watch:
`tail -F` of that file over the host's SSH connection, or a local subprocess) and asks for a
poll of the host for every burst of lines. The poll stays the truth: with no watcher running,
or a host it cannot reach, ends are seen at the next poll tick, as before.

One process (`manage.py watch_hosts`, started by `manage.py serve`); one thread per host, which
never touches the database: it only reports host ids to the main thread, which enqueues polls.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from django.db import close_old_connections

from clusters.choices import HostKind, HostState
from clusters.executors import WATCH_ALIVE, ProtocolError, Stream, TransportError, executor_for
from clusters.models import Host
from experiments import jobs, runner

log = logging.getLogger(__name__)

HOSTS_REFRESH_SECONDS = 5.0
HEARTBEAT_SECONDS = 15
MAX_BACKOFF_SECONDS = 60.0


def watched_hosts() -> dict[int, Host]:
    """The hosts that are polled (enabled, or disabled with runs still on them), local and SSH,
    that may be talked to (key pinned, not mismatched)."""
    rows = Host.objects.filter(
        pk__in=runner.hosts_to_poll(), kind__in=[HostKind.LOCAL, HostKind.SSH]
    ).exclude(state=HostState.KEY_MISMATCH)
    return {h.id: h for h in rows if h.kind == HostKind.LOCAL or h.host_key_fingerprint}


def _identity(host: Host) -> tuple[object, ...]:
    """What the stream depends on: a change restarts the host's watch."""
    return (
        host.kind,
        host.hostname,
        host.port,
        host.username,
        host.identity_file,
        host.host_key_fingerprint,
        host.run_root,
    )


class HostWatch(threading.Thread):
    """Follows one host's events; reconnects with backoff; reports its host id on each end."""

    def __init__(self, host: Host, report: Callable[[int], None]) -> None:
        super().__init__(name=f"watch-{host.name}", daemon=True)
        self.host = host
        self.report = report
        self.stopping = threading.Event()

    def run(self) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            try:
                stream = executor_for(self.host).watch(self.host.run_root, HEARTBEAT_SECONDS)
            except (TransportError, ProtocolError) as exc:
                log.info("watch %s: %s; next try in %.0f s", self.host.name, exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)
                continue
            backoff = 1.0
            log.info("watching %s", self.host.name)
            try:
                self.report(self.host.id)  # whatever ended while nobody was watching
                self._follow(stream)
            except (TransportError, ProtocolError) as exc:
                log.info("watch %s ended: %s", self.host.name, exc)
            finally:
                stream.close()

    def _follow(self, stream: Stream) -> None:
        heard = time.monotonic()
        while not self.stopping.is_set():
            line = stream.readline(1.0)
            now = time.monotonic()
            if line is None:
                if now - heard > 2 * HEARTBEAT_SECONDS + 5:
                    raise TransportError("no heartbeat: the connection is gone")
                continue
            heard = now
            if line == WATCH_ALIVE:
                continue
            # Runs that end together arrive together: one poll covers them all.
            while stream.readline(0.005) is not None:
                pass
            self.report(self.host.id)


def watch_forever(
    stop: threading.Event,
    wake: Callable[[int], None] | None = None,
    refresh_seconds: float = HOSTS_REFRESH_SECONDS,
) -> None:
    """Keep one HostWatch per watched host until `stop`; wake(host_id) for every report."""
    wake = wake or jobs.poll_soon
    reports: queue.SimpleQueue[int] = queue.SimpleQueue()
    watches: dict[int, HostWatch] = {}
    try:
        while not stop.is_set():
            close_old_connections()
            try:
                hosts = watched_hosts()
            except Exception:  # noqa: BLE001 - the database may be restarting: keep watching
                log.exception("cannot read the hosts; trying again in %.0f s", refresh_seconds)
                hosts = {host_id: watch.host for host_id, watch in watches.items()}
            for host_id, watch in list(watches.items()):
                host = hosts.get(host_id)
                stale = host is None or _identity(host) != _identity(watch.host)
                if stale or not watch.is_alive():
                    watch.stopping.set()
                    del watches[host_id]
            for host_id, host in hosts.items():
                if host_id not in watches:
                    watches[host_id] = HostWatch(host, reports.put)
                    watches[host_id].start()
            deadline = time.monotonic() + refresh_seconds
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                try:
                    host_id = reports.get(timeout=min(left, 0.5))
                except queue.Empty:
                    continue
                pending = {host_id}
                while not reports.empty():
                    pending.add(reports.get())
                for host_id in pending:
                    wake(host_id)
    finally:
        for watch in watches.values():
            watch.stopping.set()
        for watch in watches.values():
            watch.join(timeout=5)
