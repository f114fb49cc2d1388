"""Which hosts the watcher follows: the polled ones it may talk to."""

from __future__ import annotations

from experiments import services, watcher
from experiments.actors import Actor
from tests.factories import HostFactory

FP = "SHA256:" + "k" * 43


def test_the_watcher_follows_the_hosts_that_are_polled_and_may_be_talked_to(db, member):
    pinned = HostFactory(host_key_fingerprint=FP)
    HostFactory()  # no key pinned yet: only a probe may talk to it
    HostFactory(host_key_fingerprint=FP, state="key_mismatch")
    HostFactory(host_key_fingerprint=FP, enabled=False)  # disabled, nothing on it
    HostFactory(kind="slurm", host_key_fingerprint=FP)  # squeue polls, no wrapper events
    draining = HostFactory(host_key_fingerprint=FP)
    local = HostFactory(name="local", kind="local", hostname="")
    run = services.run_create(
        actor=Actor(kind="user", user=member.user), command="x", host=draining, auto_start=True
    )
    for to in ("launching", "running"):
        assert services.run_transition(run_id=run.id, to=to, actor=Actor.system())
    draining.enabled = False
    draining.save()  # disabled with a run still on it: still polled, so still watched
    assert set(watcher.watched_hosts()) == {pinned.id, draining.id, local.id}
