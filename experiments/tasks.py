"""Celery entry points: take ids, call one service. Periodic ones are driven by beat."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import shared_task
from celery.signals import worker_ready
from django.conf import settings

from experiments import jobs, runner, scheduler
from labsite import locks

log = logging.getLogger(__name__)


@functools.cache
def _redis() -> redis.Redis:
    """One client (and connection pool) per worker process, not a new connection per task."""
    return redis.Redis.from_url(settings.REDIS_URL)


def _one_at_a_time(name: str, body: Callable[[], object]) -> None:
    """Run `body` under a Redis lock; asked again while it runs, the holder runs it once more.

    So runs never overlap, and a request that came during one is served by the next, not lost.
    A holder that was killed frees the lock within seconds (see labsite.locks); what it was
    asked meanwhile is served by the next ask after that, which the timers send every few
    seconds. A stale `again` flag left by a dead holder costs one extra pass, never a wait.
    """
    client = _redis()
    again = f"labsite:{name}:again"
    client.set(again, 1, ex=300)
    while True:
        with locks.try_hold(client, f"labsite:{name}") as held:
            if not held:
                return  # the holder sees `again`
            while client.getdel(again):
                body()
        if not client.exists(again):
            return


@shared_task(name=jobs.SCHEDULE, ignore_result=True)
def schedule(full: bool = False, cpu: bool = True) -> None:
    """One scheduler pass at a time: kicks (a run created, or ended) ask for a quick pass, the
    timer for a full one; kicks during a pass become one more pass, so a burst costs a few.
    What the asks wanted (full, CPU runs too) is kept in flags until the next pass reads them."""
    client = _redis()
    full_flag, cpu_flag = "labsite:scheduler:full", "labsite:scheduler:cpu"
    if full:
        client.set(full_flag, 1, ex=300)
    if cpu:
        client.set(cpu_flag, 1, ex=300)

    def one_pass() -> None:
        full_pass = bool(client.getdel(full_flag))
        cpu_runs = bool(client.getdel(cpu_flag)) or full_pass
        started, cpu = time.perf_counter(), time.process_time()
        result = scheduler.schedule_pass(full=full_pass, cpu=cpu_runs)
        log.info(
            "schedule pass (%s): placed %d in %.1f ms, %.1f ms CPU (%d waiting, %d expired)",
            "full" if full_pass else "quick",
            result["placed"],
            (time.perf_counter() - started) * 1000,
            (time.process_time() - cpu) * 1000,
            result["waiting"],
            result["expired"],
        )

    _one_at_a_time("scheduler", one_pass)


@shared_task(name=jobs.DISPATCH, ignore_result=True)
def dispatch_run(run_id: str) -> None:
    runner.run_dispatch(run_id)


def _recent_poll_key(host_id: int) -> str:
    return f"labsite:poll:{host_id}:recent"


@shared_task(name=jobs.POLL_HOST, ignore_result=True)
def poll_host(host_id: int) -> None:
    """Polls of one host never overlap, and one asked for during a poll (the watcher's wake-up
    for a run that ended just after the host answered) runs right after it.

    When the poll saw runs end, the quick pass that gives their GPUs to the next runs runs
    here, right after that poll: no second task, no trip through the broker, and not after
    the next poll (under a burst of ends the watcher asks for another poll before this one
    is done). The pass touches only the database: the scheduler lock never spans SSH I/O.
    """
    client = _redis()
    half_interval_ms = max(1, int(settings.LABSITE["POLL_INTERVAL_SECONDS"] * 500))

    def poll() -> None:
        client.set(_recent_poll_key(host_id), 1, px=half_interval_ms)
        if runner.host_sync(host_id).get("freed"):
            schedule(full=False, cpu=False)  # a run's end frees GPUs, never a host for CPU runs

    _one_at_a_time(f"poll:{host_id}", poll)


@shared_task(name=jobs.POLL_ALL, ignore_result=True)
def poll_all() -> None:
    """The timer's polls. A host polled less than half an interval ago (a watcher's wake-up)
    is skipped: while runs end, a tick would mostly repeat the poll the watcher just asked for.
    Every host is still polled at least once per 1.5 intervals, which keeps logs, metrics and
    GPUs fresh."""
    host_ids = runner.hosts_to_poll()
    if not host_ids:
        return
    recent = _redis().mget([_recent_poll_key(h) for h in host_ids])
    for host_id, polled in zip(host_ids, recent, strict=True):
        if polled is None:
            poll_host.delay(host_id)


@shared_task(name=jobs.CANCEL, ignore_result=True)
def cancel_run(run_id: str) -> None:
    runner.run_cancel(run_id)


@shared_task(name=jobs.RECONCILE, ignore_result=True)
def reconcile() -> None:
    runner.reconcile()


@worker_ready.connect
def _reconcile_on_start(**_: Any) -> None:
    reconcile.delay()
