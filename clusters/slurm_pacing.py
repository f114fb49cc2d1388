"""How often a Slurm cluster is asked, kept in Redis for every worker process: the poll's
interval (from LABSITE_SLURM_POLL_SECONDS, its floor, doubling while nothing changes up to
LABSITE_SLURM_POLL_MAX_SECONDS, back to the floor when something does or a job is submitted),
and the Slurm commands made for it in the last minute (shown on the host).

Redis being away costs only the pacing: a cluster is then polled on every tick.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid

import redis
from django.conf import settings

log = logging.getLogger(__name__)


@functools.cache
def _client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2)


def _key(host_id: int, what: str) -> str:
    return f"labsite:slurm:{host_id}:{what}"


def _bounds() -> tuple[float, float]:
    lab = settings.LABSITE
    floor = float(lab["SLURM_POLL_SECONDS"])
    return floor, max(floor, float(lab["SLURM_POLL_MAX_SECONDS"]))


def poll_due(host_id: int) -> bool:
    """Whether the cluster's next poll is due (its interval has passed since the last one)."""
    try:
        return not _client().exists(_key(host_id, "wait"))
    except redis.RedisError:
        return True


def interval(host_id: int) -> float:
    """The cluster's poll interval now, in seconds."""
    floor, _ = _bounds()
    try:
        value = _client().get(_key(host_id, "interval"))
    except redis.RedisError:
        return floor
    return float(value) if value else floor


def polled(host_id: int, *, changed: bool) -> float:
    """After a poll: the floor again when it saw a change, else twice the last interval (up
    to the ceiling); the next poll waits that long. Returns the interval."""
    floor, ceiling = _bounds()
    seconds = floor if changed else min(ceiling, interval(host_id) * 2)
    try:
        pipe = _client().pipeline()
        pipe.set(_key(host_id, "interval"), repr(seconds), ex=3600)
        pipe.set(_key(host_id, "wait"), 1, px=max(1, int(seconds * 1000)))
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("slurm host %s: poll pacing not kept (%s)", host_id, exc)
    return seconds


def reset(host_id: int) -> None:
    """Something was asked of the cluster (a submission, a stop): poll it at the floor again,
    within the floor from now, but never sooner than the floor after the last poll (a burst of
    submissions must not become a burst of squeues: each is two or three RPCs, and clusters
    limit each user's)."""
    floor, _ = _bounds()
    floor_ms = max(1, int(floor * 1000))
    try:
        client = _client()
        client.delete(_key(host_id, "interval"))
        if client.pttl(_key(host_id, "wait")) > floor_ms:
            client.pexpire(_key(host_id, "wait"), floor_ms)
    except redis.RedisError as exc:
        log.warning("slurm host %s: poll pacing not reset (%s)", host_id, exc)


def record_calls(host_id: int, calls: int) -> None:
    """`calls` Slurm commands were just made for this cluster."""
    if calls <= 0:
        return
    now = time.time()
    key = _key(host_id, "calls")
    tag = uuid.uuid4().hex
    try:
        pipe = _client().pipeline()
        pipe.zadd(key, {f"{tag}:{i}": now for i in range(calls)})
        pipe.zremrangebyscore(key, "-inf", now - 60)
        pipe.expire(key, 120)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("slurm host %s: calls not counted (%s)", host_id, exc)


def calls_per_minute(host_id: int) -> int | None:
    """Slurm commands made for this cluster in the last 60 s (None: Redis did not answer)."""
    key = _key(host_id, "calls")
    try:
        pipe = _client().pipeline()
        pipe.zremrangebyscore(key, "-inf", time.time() - 60)
        pipe.zcard(key)
        return int(pipe.execute()[1])
    except redis.RedisError:
        return None
