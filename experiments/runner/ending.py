"""How a run that left its host ends: finished, failed (why), or back to the queue."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

from experiments import services
from experiments.actors import Actor
from experiments.choices import ACTIVE, RunReason, RunStatus
from experiments.models import Run
from experiments.rundir import log_path
from experiments.runner.classify import Failure, classify_failure

log = logging.getLogger(__name__)
SYSTEM = Actor.system()

MAX_BUSY_REQUEUES = 2


def _tail(run_id: str, size: int) -> bytes:
    """The end of this attempt's output (at most 64 KiB)."""
    path = log_path(run_id)
    size = min(size, 64 * 1024)
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read(size)
    except OSError:
        return b""


def next_attempt(run: Run) -> dict[str, Any]:
    """The fields a run goes back to the queue with: its next attempt, which starts in a run
    directory of its own (experiments.rundir), its log continuing the server's copy."""
    return {
        "attempt": run.attempt + 1,
        "log_base": run.log_size,
        "metrics_offset": 0,
        "pid": None,
        "exit_code": None,
    }


def end_failed(run: Run, code: int | None) -> bool:
    """A real CUDA out-of-memory is the run's failure (cuda_oom); "all CUDA-capable devices are
    busy" means its GPU was taken meanwhile: back to the queue, at most MAX_BUSY_REQUEUES times."""
    failure = classify_failure(_tail(run.id, run.log_size - run.log_base))
    if failure is Failure.CUDA_OOM:
        return end_run(
            run,
            RunStatus.FAILED,
            RunReason.CUDA_OOM,
            f"CUDA out of memory (exit code {code})",
            code,
        )
    if failure is Failure.GPU_BUSY and run.attempt <= MAX_BUSY_REQUEUES:
        return services.run_transition(
            run_id=run.id,
            to=RunStatus.QUEUED,
            from_=[RunStatus.RUNNING],
            actor=SYSTEM,
            reason="gpu_busy_requeue",
            message=f"its GPU was taken meanwhile (all CUDA-capable devices busy); back to the "
            f"queue, attempt {run.attempt + 1} of {MAX_BUSY_REQUEUES + 1}",
            fields={**next_attempt(run), **({} if run.host_pinned else {"host_id": None})},
            expect={"attempt": run.attempt},
        )
    return end_run(run, RunStatus.FAILED, RunReason.EXIT_CODE, f"exit code {code}", code)


def end_run(
    run: Run,
    to: str,
    reason: str,
    message: str,
    code: int | None = None,
    *,
    started_at: float | None = None,
    fields: dict[str, Any] | None = None,
) -> bool:
    """The run's end, once per attempt. `started_at` (the wrapper's epoch stamp) stands in for
    a start no poll saw (a job that ran between two polls): its GPU-hours count from then.
    `fields`: more of the run's columns, written with its end (a Slurm job's elapsed time)."""
    fields = {
        **(fields or {}),
        "exit_code": code,
        "error": message if to == RunStatus.FAILED else "",
    }
    # The run's own directory holds that stamp, and its command could write anything there:
    # only a time between its placement and now is taken.
    now = datetime.now(tz=UTC)
    if run.started_at is None and started_at is not None and math.isfinite(started_at):
        low = run.launched_at.timestamp() - 60 if run.launched_at else 0.0
        if low <= started_at <= now.timestamp():
            fields["started_at"] = datetime.fromtimestamp(started_at, tz=UTC)
    return services.run_transition(
        run_id=run.id,
        to=to,
        from_=list(ACTIVE),
        actor=SYSTEM,
        reason=reason,
        message=message,
        fields=fields,
        expect={"attempt": run.attempt},
    )
