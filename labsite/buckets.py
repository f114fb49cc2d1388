"""Token buckets in Redis: at most `rate` takes a second on average, `burst` at once, shared by
every process of every Labsite worker (a Slurm cluster's RPC limit is per user, not per
process). One round trip per take, atomic in a Lua script.

A take past the burst reserves the next free slot (the bucket goes below zero) and says how
long to wait for it: each waiter gets a slot of its own, so N waiters wake one by one, at the
rate, not all at once to compete for one token.
"""

from __future__ import annotations

import time

import redis

# tokens, at: the bucket as of `at`; refilled by rate per second up to burst.
_TAKE = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
tokens = tokens - 1
local wait = 0
if tokens < 0 then wait = -tokens / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(wait)
"""


def take(client: redis.Redis, key: str, *, rate: float, burst: int) -> float:
    """Take one token: 0.0 when one was there, else the seconds until the slot reserved for this
    take (which is then the caller's: it must not take again for it)."""
    answer = client.eval(_TAKE, 1, key, repr(rate), str(burst), repr(time.time()))
    return float(answer)
