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


@pytest.mark.parametrize("name", ["params.sh", "launch.sh", "cancel.sh", "watch.sh"])
def test_scripts_sent_without_comment_lines_parse_to_the_same_commands(name):
    """What `bash -s` gets is the script less its comment lines (read a byte at a time, they
    cost milliseconds). bash's own parse, printed back by `declare -f`, must not change: a
    removed line inside a quoted string or a here-document would show here."""
    from clusters.executors import parsed_by_bash, source

    def parsed(text: str) -> str:
        done = subprocess.run(
            ["bash", "-c", f"f() {{\n{text}\n}}\ndeclare -f f"],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    original, sent = source(name), parsed_by_bash(name)
    assert len(sent) < len(original) * 0.8, "the comments are gone"
    assert not any(line.lstrip().startswith("#") for line in sent.splitlines())
    assert parsed(sent) == parsed(original)
