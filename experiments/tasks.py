"""Celery entry points: take ids, call one service. Periodic ones are driven by beat."""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import redis
from celery import shared_task
from celery.signals import worker_ready
from django.conf import settings

from experiments import runner, scheduler

log = logging.getLogger(__name__)


@functools.cache
def _redis() -> redis.Redis:
    """One client (and connection pool) per worker process, not a new connection per task."""
    return redis.Redis.from_url(settings.REDIS_URL)


def _lock(name: str, timeout: int) -> Any:
    return _redis().lock(f"labsite:{name}", timeout=timeout)


@shared_task(name="experiments.tasks.schedule", ignore_result=True)
def schedule(full: bool = False) -> None:
    """One scheduler pass at a time; a kick during a pass makes the holder pass again.

    Kicks (a run created or ended) ask for a quick pass; the timer asks for a full one. Many
    kicks while a pass runs become one more pass, so a burst of ends costs a few passes.
    """
    client = _redis()
    again, again_full = "labsite:scheduler:again", "labsite:scheduler:again-full"
    if full:
        client.set(again_full, 1)  # before `again`: the holder reads them in that order
    client.set(again, 1)
    while True:
        lock = client.lock("labsite:scheduler", timeout=120)
        if not lock.acquire(blocking=False):
            return  # the holder sees `again` and runs another pass
        try:
            while client.getdel(again):
                full_pass = bool(client.getdel(again_full))
                started = time.perf_counter()
                result = scheduler.schedule_pass(full=full_pass)
                log.info(
                    "schedule pass (%s): placed %d in %.1f ms (%d waiting, %d expired)",
                    "full" if full_pass else "quick",
                    result["placed"],
                    (time.perf_counter() - started) * 1000,
                    result["waiting"],
                    result["expired"],
                )
        finally:
            lock.release()
        if not client.exists(again):
            return


@shared_task(name="experiments.tasks.dispatch_run", ignore_result=True)
def dispatch_run(run_id: str) -> None:
    runner.run_dispatch(run_id)


@shared_task(name="experiments.tasks.poll_host", ignore_result=True)
def poll_host(host_id: int) -> None:
    """Polls of one host never overlap; one asked for during a poll runs right after it, so a
    run that ended just after the host answered (the watcher's wake-up) is not left waiting."""
    client = _redis()
    again = f"labsite:poll:{host_id}:again"
    client.set(again, 1, ex=300)
    while True:
        lock = _lock(f"poll:{host_id}", 120)
        if not lock.acquire(blocking=False):
            return  # the holder sees `again` and polls once more
        try:
            while client.getdel(again):
                runner.host_poll(host_id)
        finally:
            lock.release()
        if not client.exists(again):
            return


@shared_task(name="experiments.tasks.poll_all", ignore_result=True)
def poll_all() -> None:
    for host_id in runner.hosts_to_poll():
        poll_host.delay(host_id)


@shared_task(name="experiments.tasks.cancel_run", ignore_result=True)
def cancel_run(run_id: str) -> None:
    runner.run_cancel(run_id)


@shared_task(name="experiments.tasks.reconcile", ignore_result=True)
def reconcile() -> None:
    runner.reconcile()


@worker_ready.connect
def _reconcile_on_start(**_: Any) -> None:
    reconcile.delay()


@shared_task(name="experiments.tasks.probe_host", ignore_result=True)
def probe_host(host_id: int) -> None:
    runner.host_probe(host_id)
