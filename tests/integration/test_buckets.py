"""Token buckets on the real test Redis (labsite.buckets): what paces a Slurm cluster's
submissions across every worker process."""

from __future__ import annotations

import time

from labsite import buckets
from tests.harness.worker import redis_test_client


def test_a_bucket_gives_its_burst_then_paces_at_its_rate():
    client = redis_test_client()
    key = f"labsite:test:bucket:{time.monotonic_ns()}"
    waits = [buckets.take(client, key, rate=2.0, burst=3) for _ in range(6)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    # Past the burst each take reserves its own slot, half a second apart at 2 a second.
    assert [round(w, 1) for w in waits[3:]] == [0.5, 1.0, 1.5], waits
    time.sleep(2.1)  # the reserved slots have passed, and a token more
    assert buckets.take(client, key, rate=2.0, burst=3) == 0.0
    assert 0 < client.ttl(key) <= 3600, "an idle bucket expires"
    client.delete(key)


def test_a_slurm_clusters_poll_backs_off_while_nothing_changes_and_counts_its_calls(settings):
    """clusters.slurm_pacing on the real test Redis."""
    from clusters import slurm_pacing

    settings.LABSITE = {
        **settings.LABSITE,
        "SLURM_POLL_SECONDS": 0.2,
        "SLURM_POLL_MAX_SECONDS": 0.8,
    }
    host_id = 10**9 + time.monotonic_ns() % 10**6
    slurm_pacing.reset(host_id)
    assert slurm_pacing.poll_due(host_id) and slurm_pacing.interval(host_id) == 0.2
    assert [slurm_pacing.polled(host_id, changed=False) for _ in range(3)] == [0.4, 0.8, 0.8]
    assert not slurm_pacing.poll_due(host_id), "the next poll waits its interval"
    time.sleep(0.9)
    assert slurm_pacing.poll_due(host_id)
    assert slurm_pacing.polled(host_id, changed=True) == 0.2, "a change: back to the floor"
    slurm_pacing.polled(host_id, changed=False)
    slurm_pacing.polled(host_id, changed=False)  # the next poll in 0.8 s
    slurm_pacing.reset(host_id)  # a submission: the next poll within the floor, not at once
    assert slurm_pacing.interval(host_id) == 0.2
    assert not slurm_pacing.poll_due(host_id), "a submission is not a poll of its own"
    time.sleep(0.25)
    assert slurm_pacing.poll_due(host_id), "the floor from the submission, not 0.8 s"
    slurm_pacing.reset(host_id)  # nothing to shorten: the poll is due already
    assert slurm_pacing.poll_due(host_id)
    assert slurm_pacing.calls_per_minute(host_id) == 0
    slurm_pacing.record_calls(host_id, 2)
    slurm_pacing.record_calls(host_id, 3)
    assert slurm_pacing.calls_per_minute(host_id) == 5
