"""Reconcile: after any restart, the hosts are asked again; lost cancels are resent."""

from __future__ import annotations

import logging
from collections import defaultdict

from clusters import slurm_pacing
from clusters.choices import HostKind
from clusters.models import Host
from experiments import jobs
from experiments.actors import Actor
from experiments.choices import ACTIVE
from experiments.models import Run

log = logging.getLogger(__name__)
SYSTEM = Actor.system()


def hosts_with_active_runs() -> list[int]:
    return list(
        Run.objects.filter(status__in=list(ACTIVE), host__isnull=False)
        .order_by()  # the model's ordering would make DISTINCT return one row per run
        .values_list("host_id", flat=True)
        .distinct()
    )


def hosts_to_poll() -> list[int]:
    """Every enabled host (runs and GPUs) and any disabled one that still has active runs; a
    Slurm cluster with active runs once its paced interval has passed (clusters.slurm_pacing)."""
    enabled = Host.objects.filter(enabled=True, kind__in=[HostKind.LOCAL, HostKind.SSH])
    active = set(hosts_with_active_runs())
    clusters = set(
        Host.objects.filter(pk__in=active, kind=HostKind.SLURM).values_list("id", flat=True)
    )
    due = {host_id for host_id in clusters if slurm_pacing.poll_due(host_id)}
    return sorted(set(enabled.values_list("id", flat=True)) | (active - clusters) | due)


def reconcile() -> dict[str, int]:
    """Bring every launching/running run in line with its host; retry lost cancels."""
    counts: dict[str, int] = defaultdict(int)
    # The hosts the tick would poll now: a Slurm cluster keeps its pace (it limits each
    # user's calls), and the tick polls it as soon as it is due.
    due = set(hosts_to_poll())
    for host_id in hosts_with_active_runs():
        if host_id not in due:
            continue
        # Through the task, so the per-host lock keeps polls of one host from overlapping.
        jobs.poll_soon(host_id)
        counts["hosts"] += 1
    for run_id in Run.objects.filter(
        status__in=list(ACTIVE), stop_requested_at__isnull=False
    ).values_list("id", flat=True):
        jobs.cancel_later(run_id)
        counts["cancels"] += 1
    return dict(counts)
