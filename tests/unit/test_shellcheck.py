"""The shell scripts sent to hosts pass shellcheck (make lint runs it too): a warning fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "clusters" / "executors" / "scripts"


def test_the_remote_scripts_have_no_shellcheck_warning():
    scripts = sorted(SCRIPTS.glob("*.sh"))
    assert {p.name for p in scripts} >= {"launch.sh", "wrapper.sh", "cancel.sh", "watch.sh"}
    if shutil.which("shellcheck") is None:
        pytest.fail(
            "shellcheck is not installed (make test installs it: apt-get install shellcheck)"
        )
    done = subprocess.run(
        ["shellcheck", "-S", "warning", *map(str, scripts)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
