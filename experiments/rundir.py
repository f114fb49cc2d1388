"""Where a run's files are: its directory on its host, and the server's copy of its log.

The runner writes them, selectors read them: both import them from here.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from experiments.models import Run


def run_dir_name(run: Run) -> str:
    """The run directory's name under its host's run root: one per attempt (a requeued run
    starts afresh in `<id>-a2`, so a late report of attempt 1 cannot move attempt 2)."""
    return run.id if run.attempt <= 1 else f"{run.id}-a{run.attempt}"


def log_path(run_id: str) -> Path:
    """The server's copy of the run's output (all attempts), appended by the poll."""
    return Path(settings.DATA_DIR) / "logs" / f"{run_id}.log"
