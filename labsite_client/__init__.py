"""A one-line metrics logger for training scripts run by Labsite.

    from labsite_client import log_metrics
    log_metrics(step=100, loss=0.31, lr=3e-4)

Appends one JSON line to $LABSITE_RUN_DIR/metrics.jsonl (the poller picks it up); outside
Labsite (no LABSITE_RUN_DIR) it does nothing, so scripts run the same by hand. Standard library
only: copy this file next to a script if the package is not installed on the host.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["log_metrics"]


def log_metrics(step: int | None = None, **values: float) -> None:
    """Record numeric values (keys prefixed `final/` are final results) at an optional step."""
    run_dir = os.environ.get("LABSITE_RUN_DIR")
    if not run_dir:
        return
    record: dict[str, Any] = {} if step is None else {"step": int(step)}
    for key, value in values.items():
        number = float(value)
        if math.isfinite(number):
            record[key] = number
    line = json.dumps(record, separators=(",", ":")) + "\n"
    # One write of one whole line in append mode: concurrent writers never interleave a line.
    fd = os.open(
        os.path.join(run_dir, "metrics.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
    )
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
