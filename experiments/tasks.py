"""Celery entry points: take ids, call one service. Periodic ones are driven by beat."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
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


def _one_at_a_time(
    name: str,
    body: Callable[[], object],
    *,
    flags: Sequence[str] = (),
    after: Callable[[], object] | None = None,
) -> None:
    """Run `body` under a Redis lock; asked again while it runs, the holder runs it once more.

    So runs never overlap, and a request that came during one is served by the next, not lost.
    A holder that was killed frees the lock within seconds (see labsite.locks); what it was
    asked meanwhile is served by the next ask after that, which the timers send every few
    seconds. A stale `again` flag left by a dead holder costs one extra pass, never a wait.

    `flags` (Redis keys: what this ask wants of the next run) are set with `again` in one
    round trip. When `body` returns true, the lock is released and `after` runs: the lock never
    spans what it does (SSH I/O), and what was asked meanwhile is served by the next turn.
    """
    client = _redis()
    again = f"labsite:{name}:again"
    asking = client.pipeline()  # MULTI: a holder sees the flags of every `again` it takes
    for key in (again, *flags):
        asking.set(key, 1, ex=300)
    asking.execute()
    while True:
        pending = False
        with locks.try_hold(client, f"labsite:{name}") as held:
            if not held:
                return  # the holder sees `again`
            while not pending and client.getdel(again):
                pending = bool(body()) and after is not None
        if pending and after is not None:
            after()
        if not client.exists(again):
            return


FULL_FLAG, CPU_FLAG, GPU_FLAG = (
    "labsite:scheduler:full",
    "labsite:scheduler:cpu",
    "labsite:scheduler:gpu",
)
# A pass starts this many of the runs it placed itself, once it has let go of the scheduler
# lock: no trip through the broker to a second process. The others go out as dispatch tasks
# as their placements commit, so the worker's other processes launch them in parallel.
INLINE_DISPATCHES = 1
# A poll's pass runs in the host's poller, which holds that host's poll lock: it sends tasks
# (measured: starting one there, after the poll lock, changed nothing in the burst bench).
POLL_INLINE_DISPATCHES = 0


def _schedule(*, full: bool, cpu: bool, gpu: bool, inline: int) -> None:
    client = _redis()
    held: list[str] = []

    def one_pass() -> bool:
        taking = client.pipeline()
        taking.getdel(FULL_FLAG)
        taking.getdel(CPU_FLAG)
        taking.getdel(GPU_FLAG)
        full_flag, cpu_flag, gpu_flag = taking.execute()
        full_pass = bool(full_flag)
        cpu_runs = bool(cpu_flag) or full_pass
        gpu_runs = bool(gpu_flag) or full_pass
        began, started, cpu_time = time.time(), time.perf_counter(), time.process_time()
        with jobs.dispatches_held(inline) as placed:
            try:
                result = scheduler.schedule_pass(full=full_pass, cpu=cpu_runs, gpu=gpu_runs)
            finally:
                held.extend(placed)
        # `began` (epoch seconds) lets the benchmarks line a pass up with a run's events.
        log.info(
            "schedule pass (%s): placed %d in %.1f ms, %.1f ms CPU (%d waiting, %d expired; "
            "began %.6f)",
            "full" if full_pass else "quick",
            result["placed"],
            (time.perf_counter() - started) * 1000,
            (time.process_time() - cpu_time) * 1000,
            result["waiting"],
            result["expired"],
            began,
        )
        return bool(held)

    def start() -> None:
        while held:
            runner.run_dispatch(held.pop(0))

    wants = ((FULL_FLAG, full), (CPU_FLAG, cpu), (GPU_FLAG, gpu))
    flags = [flag for flag, wanted in wants if wanted]
    try:
        _one_at_a_time("scheduler", one_pass, flags=flags, after=start)
    finally:
        for run_id in held:  # not started (a pass or a dispatch raised): they go out as tasks
            jobs.dispatch_later(run_id)


@shared_task(name=jobs.SCHEDULE, ignore_result=True)
def schedule(full: bool = False, cpu: bool = True, gpu: bool = True) -> None:
    """One scheduler pass at a time: kicks (a run created, or ended) ask for a quick pass, the
    timer for a full one; kicks during a pass become one more pass, so a burst costs a few.
    What the asks wanted (full; the CPU runs, the GPU runs) is kept in flags until the next
    pass reads them.
    The runs a pass placed start from here, once the scheduler lock is released."""
    _schedule(full=full, cpu=cpu, gpu=gpu, inline=INLINE_DISPATCHES)


@shared_task(name=jobs.DISPATCH, ignore_result=True)
def dispatch_run(run_id: str, reserved: bool = False) -> None:
    runner.run_dispatch(run_id, reserved=reserved)


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
            # A run's end frees its CPU slots, and its GPUs: both queues. What the pass places
            # goes out as tasks: this process is the host's poller (its lock is held).
            _schedule(full=False, cpu=True, gpu=True, inline=POLL_INLINE_DISPATCHES)

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
