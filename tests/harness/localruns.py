"""Helpers for tests whose runs execute on the `local` host (as its run user, where there is one)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clusters import localuser


@contextmanager
def run_user_dir() -> Iterator[Path]:
    """A fresh directory the local host's runs may write in (pytest's tmp_path is root's alone,
    and local runs execute as the run user when the machine has one)."""
    path = Path(tempfile.mkdtemp(prefix="labsite-test-", dir="/tmp"))
    user = localuser.run_user()
    if user is not None:
        os.chown(path, user.uid, user.gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def local_root(run_root: str) -> Path:
    """The local host's run root as a path on this machine (`~` is the run user's home)."""
    user = localuser.run_user()
    home = user.home if user is not None else os.path.expanduser("~")
    return Path(home, run_root[2:]) if run_root.startswith("~/") else Path(run_root)
