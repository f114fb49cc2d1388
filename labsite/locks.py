"""Redis locks that a dead holder frees within seconds and a live holder keeps for as long as it
needs.

A fixed TTL gets one of the two wrong: a long one outlives a holder that was killed (kill -9,
the OOM killer), and no scheduler pass or poll of that host runs until it expires; a short one
expires under a live holder whose pass happens to be slow. So the TTL is short, and a thread of
the holder's own process renews it while the body runs: the renewals die with the process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import LockNotOwnedError
from redis.lock import Lock

log = logging.getLogger(__name__)

TTL_SECONDS = 10.0


@contextmanager
def try_hold(client: redis.Redis, key: str, *, ttl: float = TTL_SECONDS) -> Iterator[bool]:
    """Take `key` if it is free (never wait for it); yields whether this process holds it.

    While held, the TTL is renewed every ttl/3 seconds, so only a holder that stopped running
    (killed, frozen) loses it, at most `ttl` seconds after its last renewal. A holder that lost
    it anyway (Redis restarted, the process was frozen for longer than the TTL) gets a warning,
    not an exception: what the lock serializes must already be safe to overlap now and then.
    """
    # thread_local=False: the renewing thread needs the token that this thread acquired with.
    lock = client.lock(key, timeout=ttl, thread_local=False)
    if not lock.acquire(blocking=False):
        yield False
        return
    released = threading.Event()
    renewer = threading.Thread(
        target=_renew, args=(lock, key, ttl / 3, released), name=f"renew {key}", daemon=True
    )
    renewer.start()
    try:
        yield True
    finally:
        released.set()
        # Bounded: a renewal stuck on a dead connection must not keep the holder from returning.
        renewer.join(timeout=ttl)
        try:
            lock.release()
        except LockNotOwnedError:
            log.warning("lock %s had expired before its holder released it", key)
        except redis.RedisError as exc:
            # Raising here would hide what the body raised, for a lock that frees itself anyway.
            log.warning("could not release lock %s (it expires within %g s): %s", key, ttl, exc)


def _renew(lock: Lock, key: str, every: float, released: threading.Event) -> None:
    while not released.wait(every):
        try:
            lock.reacquire()
        except LockNotOwnedError:
            log.warning("lock %s expired while its holder still ran; it stops renewing it", key)
            return
        except redis.RedisError as exc:
            # Redis away for a moment: the next renewal may still be in time.
            log.warning("could not renew lock %s: %s", key, exc)
