"""Token buckets on the real test Redis (labsite.buckets): what paces a Slurm cluster's
submissions across every worker process."""

from __future__ import annotations

import time

from labsite import buckets
from tests.harness.worker import redis_test_client


def test_a_bucket_gives_its_burst_then_paces_at_its_rate():
    client = redis_test_client()
    key = f"labsite:test:bucket:{time.monotonic_ns()}"
    waits = [buckets.take(client, key, rate=2.0, burst=3) for _ in range(3)]
    assert waits == [0.0, 0.0, 0.0]
    wait = buckets.take(client, key, rate=2.0, burst=3)
    assert 0.4 < wait <= 0.5, "empty: the next token is half a second away at 2 a second"
    time.sleep(wait + 0.05)
    assert buckets.take(client, key, rate=2.0, burst=3) == 0.0
    assert buckets.take(client, key, rate=2.0, burst=3) > 0
    assert 0 < client.ttl(key) <= 3600, "an idle bucket expires"
    client.delete(key)
