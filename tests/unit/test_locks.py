"""labsite.locks against a real Redis: a live holder keeps its lock past the TTL, a dead one
frees it within the TTL."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from django.conf import settings

from labsite.locks import try_hold
from tests.harness.worker import ROOT, redis_test_client, wait_for

KEY = "labsite:test-locks"


@pytest.fixture
def client():
    client = redis_test_client()
    client.delete(KEY)
    yield client
    client.delete(KEY)


def test_a_holder_busy_for_longer_than_the_ttl_keeps_its_lock(client, caplog):
    """GIVEN a 0.6 s TTL WHEN the holder's body takes 2 s THEN nobody else gets the lock meanwhile
    (the renewals kept it) and it is free as soon as the holder is done."""
    with try_hold(client, KEY, ttl=0.6) as held:
        assert held
        for _ in range(4):
            time.sleep(0.5)
            with try_hold(redis_test_client(), KEY, ttl=0.6) as other:
                assert not other, "the lock expired under a live holder"
    assert not client.exists(KEY)
    with try_hold(client, KEY, ttl=0.6) as again:
        assert again
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


HOLDER = """
import sys, time, redis
from labsite.locks import try_hold
with try_hold(redis.Redis.from_url(sys.argv[1]), sys.argv[2], ttl=float(sys.argv[3])) as held:
    print("held" if held else "busy", flush=True)
    time.sleep(600)
"""


def test_a_lock_whose_holder_was_killed_is_free_within_the_ttl(client):
    """GIVEN a lock held (and renewed) by another process for longer than its 1.5 s TTL WHEN that
    process is killed with SIGKILL THEN the lock is free again within the TTL."""
    ttl = 1.5
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, settings.REDIS_URL, KEY, str(ttl)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        time.sleep(ttl * 2)
        with try_hold(client, KEY, ttl=ttl) as taken:
            assert not taken, "a live holder in another process lost its lock"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        killed_at = time.monotonic()
        wait_for(lambda: not client.exists(KEY), timeout=ttl + 0.5, interval=0.05)
        assert time.monotonic() - killed_at <= ttl + 0.2
        with try_hold(client, KEY, ttl=ttl) as taken:
            assert taken
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(10)


def test_a_lock_lost_while_held_is_a_warning_not_an_error(client, caplog):
    """GIVEN a held lock WHEN its key vanishes (Redis restarted without persistence) and someone
    else takes it THEN the holder finishes its body, warns, and does not release the other's."""
    with try_hold(client, KEY, ttl=0.6) as held:
        assert held
        client.delete(KEY)
        client.set(KEY, "someone-else")
        time.sleep(0.5)  # a renewal falls due and finds the lock gone
    assert client.get(KEY) == b"someone-else"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("expired while its holder still ran" in w for w in warnings), warnings
    assert any("expired before its holder released it" in w for w in warnings), warnings
