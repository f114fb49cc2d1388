"""What a poll or a dispatch learns about the host itself."""

from __future__ import annotations

import logging

from clusters.executors import (
    HostKeyMismatch,
)
from clusters.models import Host
from clusters.services import (
    host_mark_unreachable,
    host_refuse_key,
)
from experiments.choices import RunReason
from experiments.models import Run

log = logging.getLogger(__name__)


def host_unreachable(host: Host, runs: list[Run], error: str) -> None:
    """A transport error fails nothing: runs stay running, flagged, until the host answers.

    The flag (`reason = host_unreachable`) is bookkeeping, written here without run_transition
    or an event: it never decides a run's status (no transition reads it), the host's own row
    records the outage (clusters.services.host_mark_unreachable), and the next answer clears
    it (host_answered). One UPDATE for all the host's runs."""
    host_mark_unreachable(host=host, error=error)
    Run.objects.filter(pk__in=[r.pk for r in runs], reason="").update(
        reason=RunReason.HOST_UNREACHABLE
    )


def host_answered(runs: list[Run]) -> None:
    """The host answered: its runs' host_unreachable flags go, in one UPDATE (none if unset)."""
    flagged = [r.pk for r in runs if r.reason == RunReason.HOST_UNREACHABLE]
    if flagged:
        Run.objects.filter(pk__in=flagged, reason=RunReason.HOST_UNREACHABLE).update(reason="")
        for run in runs:
            if run.reason == RunReason.HOST_UNREACHABLE:
                run.reason = ""


def host_key_mismatch(host: Host, exc: HostKeyMismatch) -> None:
    """Refuse the host (clusters tells the lab through host_key_changed: an alert)."""
    host_refuse_key(host=host, expected=exc.expected, presented=exc.got, note=str(exc))
