"""The server's copy of runs' output and metrics, appended as a poll brings them.

A poll reports every active run of a host at once, and copy_outputs writes what all of them
brought in a fixed number of queries: log bytes go to files, the runs' offsets and the new
Metric rows to the database in one transaction (batched updates, one bulk insert), however many
runs had something new. The offsets are bookkeeping: they decide no state.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from clusters.executors import (
    RunReport,
)
from experiments.models import Metric, Run
from experiments.rundir import log_path
from labsite.bulk import update_each

log = logging.getLogger(__name__)


@dataclass
class _NewMetrics:
    """Metric lines a report brought for one run, parsed, not yet numbered or stored."""

    run: Run
    read_from: int  # the metrics_offset the host read them from
    read_to: int  # the offset after them
    values: list[tuple[str, int | None, float]] = field(default_factory=list)  # key, step, value


def copy_outputs(pairs: Iterable[tuple[Run, RunReport]]) -> set[str]:
    """Append each run's new log bytes and ingest its metric lines; returns the ids of the runs
    whose whole log the server now has. Runs with nothing new cost no query at all."""
    logs: list[Run] = []
    metrics: list[_NewMetrics] = []
    complete: set[str] = set()
    for run, report in pairs:
        if _append_log(run, report):
            logs.append(run)
        if report.metrics_lines or report.metrics_offset != run.metrics_offset:
            metrics.append(_parse(run, report))
        if run.log_size - run.log_base >= report.log_size:
            complete.add(run.id)
    if logs or metrics:
        with transaction.atomic():
            if logs:
                update_each(logs, ["log_size"])
            if metrics:
                _store_metrics(metrics)
    return complete


def _append_log(run: Run, report: RunReport) -> bool:
    """Append the report's log chunk to the server's copy; True when bytes were added."""
    if not report.log_chunk or report.log_offset != run.log_size - run.log_base:
        return False
    path = log_path(run.id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Logs may hold whatever a run printed (tokens too): the server's alone, 0600 in 0700.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "ab") as f:
        f.truncate(run.log_size)  # a copy cut short by a crash is redone from the offset
        f.write(report.log_chunk)
    run.log_size += len(report.log_chunk)
    return True


def _parse(run: Run, report: RunReport) -> _NewMetrics:
    new = _NewMetrics(run=run, read_from=run.metrics_offset, read_to=report.metrics_offset)
    for line in report.metrics_lines:
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
            new.values.append((str(key)[:200], step, float(value)))
    return new


def _store_metrics(batch: list[_NewMetrics]) -> None:
    """Number and store the new rows of every run whose offset is still the one its lines were
    read from; the offset and the next seq move with the rows, in the same transaction.

    The runs are read FOR UPDATE (on SQLite the transaction is BEGIN IMMEDIATE: one writer),
    so a second copier of the same report (a cancel's sync next to a poll) waits, then finds
    the offset moved and adds nothing: a retried poll re-reads, never skips or doubles.
    """
    current: dict[str, tuple[int, int, dict[str, Any]]] = {
        run_id: (offset, seq, latest)
        for run_id, offset, seq, latest in Run.objects.select_for_update()
        .filter(pk__in=[new.run.id for new in batch])
        .order_by("pk")
        .values_list("id", "metrics_offset", "metrics_seq", "metrics_latest")
    }
    moved: list[Run] = []
    rows: list[Metric] = []
    for new in batch:
        run = new.run
        if run.id not in current or current[run.id][0] != new.read_from:
            continue  # copied meanwhile by someone else (or gone): theirs stands
        _, seq, latest = current[run.id]
        latest = dict(latest)
        for key, step, value in new.values:
            rows.append(Metric(run=run, key=key, step=step, value=value, seq=seq))
            seq += 1
            latest[key] = {"step": step, "value": value}
        run.metrics_offset, run.metrics_seq, run.metrics_latest = new.read_to, seq, latest
        moved.append(run)
    if moved:
        update_each(moved, ["metrics_offset", "metrics_seq", "metrics_latest"])
        Metric.objects.bulk_create(rows)
