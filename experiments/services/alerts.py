"""Alerts: raised once, answered once; an answer may act on the run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from experiments.actors import Actor
from experiments.choices import (
    NON_TERMINAL,
    TERMINAL,
    AlertStatus,
)
from experiments.models import (
    Alert,
    Run,
)
from experiments.services.runs import run_rerun, run_stop
from experiments.services.runspec import require_owner
from labsite import roles
from labsite.errors import Conflict

ALERT_ACTIONS = {"stop": run_stop, "rerun": run_rerun}


def alert_raise(
    *,
    message: str,
    run: Run | None = None,
    severity: str = "warning",
    choices: Iterable[str] = ("acknowledge",),
    dedupe_key: str = "",
    once: bool = False,
) -> Alert:
    """Raise an alert; with a dedupe_key, at most one is open per key and raising it again
    returns that one.

    The database's partial unique index on open keys decides a race between two workers, not a
    check-then-insert: the loser's insert fails inside its savepoint and it returns the winner's
    alert. once=True also counts an answered alert with the key (a standing condition that every
    pass sees again, told once).
    """
    if not dedupe_key:
        return Alert.objects.create(
            run=run, message=message, severity=severity, choices=list(choices)
        )
    same = Alert.objects.filter(dedupe_key=dedupe_key)
    if not once:
        same = same.filter(status=AlertStatus.OPEN)
    while True:
        existing = same.order_by("-id").first()
        if existing is not None:
            return existing
        try:
            with transaction.atomic():
                return Alert.objects.create(
                    run=run,
                    message=message,
                    severity=severity,
                    choices=list(choices),
                    dedupe_key=dedupe_key,
                )
        except IntegrityError:
            # Lost the race: another worker's open alert is there now, and the next read
            # returns it. Any other integrity error (a run deleted meanwhile) is the caller's.
            if not Alert.objects.filter(dedupe_key=dedupe_key, status=AlertStatus.OPEN).exists():
                raise


def alert_respond(*, alert: Alert, actor: Actor, choice: str) -> Alert:
    """Record the answer once, then act on the run when the choice is an action."""
    if alert.run is not None:
        require_owner(actor, alert.run.created_by_id, "answer this alert")
    elif not (roles.is_pi(actor.user) or roles.is_admin(actor.user)):
        raise PermissionDenied("only a PI or an admin may answer lab-wide alerts")
    if choice not in alert.choices:
        raise ValidationError({"choice": f"{choice!r} is not one of {', '.join(alert.choices)}"})
    with transaction.atomic():
        if not Alert.objects.filter(pk=alert.pk, status=AlertStatus.OPEN).update(
            status=AlertStatus.RESOLVED,
            response=choice,
            responded_by=actor.user,
            responded_at=timezone.now(),
        ):
            alert.refresh_from_db()
            raise Conflict(f"alert {alert.pk} was already answered ({alert.response})")
        action = ALERT_ACTIONS.get(choice)
        if (
            alert.run is not None
            and action is not None
            and alert.run.status in NON_TERMINAL | (TERMINAL if choice == "rerun" else set())
        ):
            action(run=alert.run, actor=actor)
    alert.refresh_from_db()
    return alert


def alert_host_key_changed(*, host: Any, expected: str, presented: str, **_: Any) -> None:
    """clusters' host_key_changed: tell the admins (once while the alert is open)."""
    alert_raise(
        message=f"Host {host.name} presented a different SSH host key ({presented}, pinned "
        f"{expected}). Nothing is sent to it until an admin accepts the new key.",
        severity="critical",
        choices=["acknowledge"],
        dedupe_key=f"host-key:{host.name}",
    )
