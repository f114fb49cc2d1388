"""gunicorn's settings for `manage.py serve` (`--config python:labsite.gunicorn`).

The app is loaded once, in the master (`--preload`), and the workers are forked from it: they
share its pages instead of each importing Django, DRF and the apps again (measured: 4 processes
223 MB PSS without, 87 MB with). Python's collector would write to every shared object and
unshare its page, so what the master loaded is frozen out of its reach first.
"""

from __future__ import annotations

import gc
from typing import Any


def pre_fork(server: Any, worker: Any) -> None:
    # Nothing may be shared across the fork but pages: the master closes any database
    # connection it opened (a worker closing an inherited one would end it for all).
    from django.db import connections

    connections.close_all()
    gc.collect()
    gc.freeze()
