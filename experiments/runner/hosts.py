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
from experiments.actors import Actor
from experiments.choices import RunReason
from experiments.models import Run

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)
SYSTEM = Actor.system()


def host_unreachable(host: Host, runs: list[Run], error: str) -> None:
    """A transport error fails nothing: runs stay running, flagged, until the host answers."""
    host_mark_unreachable(host=host, error=error)
    # Bookkeeping, not a state: it never decides a run's status, and the next answer clears it.
    Run.objects.filter(pk__in=[r.pk for r in runs], reason="").update(
        reason=RunReason.HOST_UNREACHABLE
    )


def host_key_mismatch(host: Host, exc: HostKeyMismatch) -> None:
    """Refuse the host (clusters tells the lab through host_key_changed: an alert)."""
    host_refuse_key(host=host, expected=exc.expected, presented=exc.got, note=str(exc))
