"""Failed sign-ins and bad API tokens, counted per client address until a quiet minute.

The counts live in Redis so that every web worker sees the same ones. A password is guessable,
so a sign-in from an address past the limit is refused before the password is checked; a token
is 256 random bits, so a valid one is never refused and a wrong one past the limit gets a 429
instead of a 401 (it keeps the noise of a broken or hostile client out of the database).
Redis being down never locks anyone out: the counts are then simply not kept.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import redis
from django.conf import settings

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60
PREFIX = "labsite:authfail:"


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)


def client_address(request: Any) -> str:
    """The address failures are counted for. Behind the README's reverse proxy on the same
    machine (LABSITE_HTTPS) every request comes from loopback, and one client's failures would
    lock out everyone: there it is the last X-Forwarded-For entry, the one the proxy itself
    appended (what a client put before it is not believed)."""
    remote = str(request.META.get("REMOTE_ADDR") or "unknown")
    forwarded = str(request.META.get("HTTP_X_FORWARDED_FOR") or "")
    if settings.HTTPS and forwarded and (remote.startswith("127.") or remote == "::1"):
        last = forwarded.rsplit(",", 1)[-1].strip()
        return last[:64] or remote
    return remote


def _key(request: Any) -> str:
    return PREFIX + client_address(request)


def limit() -> int:
    return int(settings.LABSITE["AUTH_FAILURES_PER_MINUTE"])


def failures(request: Any) -> int:
    """Failures from the request's address in the current window."""
    try:
        value = _client(settings.REDIS_URL).get(_key(request))
    except redis.RedisError:
        log.warning("cannot read sign-in failures from Redis; not throttling")
        return 0
    return int(value or 0)


def record_failure(request: Any) -> int:
    """Count one failure from the request's address; returns the count in this window."""
    try:
        pipe = _client(settings.REDIS_URL).pipeline()
        pipe.incr(_key(request))
        pipe.expire(_key(request), WINDOW_SECONDS)  # a minute after the last failure
        count, _ = pipe.execute()
    except redis.RedisError:
        log.warning("cannot count a sign-in failure in Redis; not throttling")
        return 0
    return int(count)


def blocked(request: Any) -> bool:
    return failures(request) >= limit()


def message() -> str:
    return (
        f"too many failed sign-ins or bad tokens from your address (more than {limit()} a "
        f"minute); try again in a minute"
    )
