"""Token buckets in Redis: at most `rate` takes a second on average, `burst` at once, shared by
every process of every Labsite worker (a Slurm cluster's RPC limit is per user, not per
process). One round trip per take, atomic in a Lua script.
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
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(wait)
"""


def take(client: redis.Redis, key: str, *, rate: float, burst: int) -> float:
    """Take one token: 0.0 when taken, else the seconds until one will be there (none taken)."""
    answer = client.eval(_TAKE, 1, key, repr(rate), str(burst), repr(time.time()))
    return float(answer)
