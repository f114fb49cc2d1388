"""The server's copy of a run's output and metrics, appended as the poll brings them."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from django.db import transaction

from clusters.executors import (
    RunReport,
)
from experiments.actors import Actor
from experiments.models import Metric, Run
from experiments.rundir import log_path

log = logging.getLogger(__name__)
SYSTEM = Actor.system()


def copy_output(run: Run, report: RunReport) -> bool:
    """Append new log bytes and ingest metric lines; True when the server has the whole log."""
    updates: dict[str, Any] = {}
    if report.log_chunk and report.log_offset == run.log_size - run.log_base:
        path = log_path(run.id)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Logs may hold whatever a run printed (tokens too): the server's alone, 0600 in 0700.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.truncate(run.log_size)  # a copy cut short by a crash is redone from the offset
            f.write(report.log_chunk)
        run.log_size += len(report.log_chunk)
        updates["log_size"] = run.log_size
    if report.metrics_lines or report.metrics_offset != run.metrics_offset:
        latest = dict(run.metrics_latest)
        rows = _metric_rows(run, report.metrics_lines, latest)
        with transaction.atomic():
            # The offset moves only with the rows it covers: a retried poll re-reads, not skips.
            if Run.objects.filter(pk=run.pk, metrics_offset=run.metrics_offset).update(
                metrics_offset=report.metrics_offset, metrics_latest=latest
            ):
                Metric.objects.bulk_create(rows)
                run.metrics_offset, run.metrics_latest = report.metrics_offset, latest
    if updates:
        Run.objects.filter(pk=run.pk).update(**updates)
    return run.log_size - run.log_base >= report.log_size


def _metric_rows(run: Run, lines: list[str], latest: dict[str, Any]) -> list[Metric]:
    rows = []
    seq = Metric.objects.filter(run=run).count()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step")
        step = int(step) if isinstance(step, int | float) and not isinstance(step, bool) else None
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            rows.append(Metric(run=run, key=str(key)[:200], step=step, value=float(value), seq=seq))
            seq += 1
            latest[str(key)[:200]] = {"step": step, "value": float(value)}
    return rows
