"""Alerts are deduplicated by what they are about (dedupe_key), not by their message text, and
the database decides a race: at most one open alert per key, on PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from clusters.models import Host
from clusters.signals import host_key_changed
from experiments import scheduler, services
from experiments.actors import Actor
from experiments.choices import AlertStatus
from experiments.models import Alert, Plan, Run
from tests.factories import GpuFactory


def _answer(alert: Alert, person) -> None:
    services.alert_respond(
        alert=alert, actor=Actor(kind="user", user=person.user), choice="acknowledge"
    )


def test_the_same_key_raised_twice_is_one_open_alert_and_a_new_one_once_answered(db, pi):
    first = services.alert_raise(message="disk 91% full", dedupe_key="disk:gpu-1")
    again = services.alert_raise(message="disk 93% full", dedupe_key="disk:gpu-1")
    assert again.pk == first.pk and Alert.objects.count() == 1
    # Another key, or none, is another alert.
    services.alert_raise(message="disk 91% full", dedupe_key="disk:gpu-2")
    services.alert_raise(message="disk 91% full")
    services.alert_raise(message="disk 91% full")
    assert Alert.objects.count() == 4

    _answer(first, pi)
    later = services.alert_raise(message="disk 99% full", dedupe_key="disk:gpu-1")
    assert later.pk != first.pk and later.status == AlertStatus.OPEN
    assert Alert.objects.filter(dedupe_key="disk:gpu-1").count() == 2
    assert Alert.objects.filter(dedupe_key="disk:gpu-1", status="open").count() == 1


def test_once_counts_an_answered_alert_too(db, pi):
    first = services.alert_raise(message="over", dedupe_key="budget:p1:10", once=True)
    _answer(first, pi)
    assert services.alert_raise(message="over", dedupe_key="budget:p1:10", once=True) == first
    assert Alert.objects.count() == 1


def test_the_database_refuses_a_second_open_alert_with_a_key(db):
    Alert.objects.create(message="a", dedupe_key="k")
    Alert.objects.create(message="answered", dedupe_key="k", status=AlertStatus.RESOLVED)
    Alert.objects.create(message="no key")
    Alert.objects.create(message="no key")
    from django.db import IntegrityError

    with pytest.raises(IntegrityError), transaction.atomic():
        Alert.objects.create(message="b", dedupe_key="k")


@pytest.mark.django_db(transaction=True)
def test_a_raise_that_loses_the_race_returns_the_winners_alert():
    """GIVEN one worker that has inserted an alert and not yet committed WHEN another raises the
    same key (its read sees nothing yet) THEN its insert waits on the unique index, fails when
    the first commits, and it returns the first one's alert: one open alert, no error."""
    inserted, results = threading.Event(), {}

    def first() -> None:
        try:
            with transaction.atomic():
                results["first"] = services.alert_raise(message="x", dedupe_key="race:1").pk
                inserted.set()
                # Long enough for the second to read (nothing) and block on its insert.
                threading.Event().wait(0.5)
        finally:
            connection.close()

    def second() -> None:
        try:
            inserted.wait(5)
            started = time.monotonic()
            results["second"] = services.alert_raise(message="x", dedupe_key="race:1").pk
            results["waited"] = time.monotonic() - started
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results["second"] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results["second"] == results["first"], results
    assert results["waited"] > 0.3, results  # it did block on the index: the race was real
    assert Alert.objects.filter(dedupe_key="race:1", status="open").count() == 1


@pytest.mark.django_db(transaction=True)
def test_many_workers_racing_leave_one_open_alert_per_key():
    """GIVEN 4 threads released together, 20 times WHEN each raises the same key THEN each key
    has exactly one alert and every thread got it back."""
    for trial in range(20):
        key = f"race:many:{trial}"
        barrier = threading.Barrier(4)
        got: list[object] = []

        def raise_it(
            key: str = key, barrier: threading.Barrier = barrier, got: list[object] = got
        ) -> None:
            try:
                barrier.wait()
                got.append(services.alert_raise(message="x", dedupe_key=key).pk)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                got.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=raise_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert Alert.objects.filter(dedupe_key=key).count() == 1
        assert got == [Alert.objects.get(dedupe_key=key).pk] * 4, got


def test_a_changed_host_key_alerts_once_while_open(db, pi):
    """host_key_changed sent twice (two workers saw the new key) is one critical alert; after an
    admin answered it, a later change is a new one."""
    host = Host.objects.create(name="gpu-7", hostname="10.0.0.7")
    for presented in ("SHA256:new", "SHA256:newer"):
        host_key_changed.send(sender=Host, host=host, expected="SHA256:old", presented=presented)
    [alert] = Alert.objects.all()
    assert alert.dedupe_key == "host-key:gpu-7" and alert.severity == "critical"
    assert "SHA256:new" in alert.message
    _answer(alert, pi)
    host_key_changed.send(sender=Host, host=host, expected="SHA256:new", presented="SHA256:x")
    assert Alert.objects.filter(dedupe_key="host-key:gpu-7").count() == 2


def test_a_plan_over_budget_is_told_once_per_budget(db, member, pi):
    """GIVEN a plan past its 1 GPU-hour budget WHEN passes run again, before and after the PI
    answered the alert THEN one alert; WHEN the PI raises the budget and the plan reaches it
    again THEN one more."""
    host = Host.objects.create(name="n1", hostname="10.0.0.1", state="online")
    GpuFactory(host=host, index=0)
    author, reviewer = Actor(kind="user", user=member.user), Actor(kind="user", user=pi.user)
    plan = services.plan_submit(plan=services.plan_create(actor=author, title="b"), actor=author)
    services.plan_approve(plan=plan, actor=reviewer, gpu_hours_budget=1)
    done = services.run_create(actor=author, command="x", gpus=1, plan=plan, auto_start=False)
    Run.objects.filter(pk=done.pk).update(
        status="finished", started_at=timezone.now() - timedelta(hours=2), ended_at=timezone.now()
    )
    scheduler.schedule_pass(full=True)
    scheduler.schedule_pass(full=True)
    [alert] = Alert.objects.filter(dedupe_key__startswith=f"budget:{plan.id}:")
    _answer(alert, pi)
    scheduler.schedule_pass(full=True)
    assert Alert.objects.filter(dedupe_key__startswith=f"budget:{plan.id}:").count() == 1
    Plan.objects.filter(pk=plan.pk).update(gpu_hours_budget=1.5)
    scheduler.schedule_pass(full=True)
    scheduler.schedule_pass(full=True)
    assert Alert.objects.filter(dedupe_key__startswith=f"budget:{plan.id}:").count() == 2
    assert Alert.objects.filter(dedupe_key=f"budget:{plan.id}:1.5", status="open").count() == 1
