"""A GPU host without a GPU: a fake ``nvidia-smi`` per SSH test host (see TESTING.md).

Plain Python, no pytest.  :func:`install` puts a POSIX sh ``nvidia-smi`` into the host's
``/usr/local/bin`` (``host.write_bin``; that host only) and state files under
``<host.home>/fakegpu/`` (``$HOME/fakegpu`` on the host: the same directory) that the test
rewrites to make GPUs busy, free, taken by someone else's process, or gone::

    fakegpu.install(h, fakegpu.gpu_rows(4, 1), apps=[{"uuid": ..., "pid": 4242, "used": 40960}])
    fakegpu.set_gpus(h, rows)      # e.g. one row with used=30000, or one row fewer
    fakegpu.set_apps(h, [])        # no compute process left
    fakegpu.garbage(h)             # "NVIDIA-SMI has failed ..." and exit 9, whatever is asked
    fakegpu.remove(h)              # no nvidia-smi on PATH at all

The script answers exactly the two queries Labsite is meant to make:

- ``--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu
  --format=csv,noheader,nounits``: prints ``gpus.csv``
  (``0, GPU-..., NVIDIA A100-SXM4-80GB, 81920, 4, 0``);
- ``--query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits``: prints
  ``apps.csv`` (``GPU-..., 48213, 40960``), empty when no process runs (as the real one);

and anything else goes to stderr with exit status 2, so a query the code did not mean to make
fails loudly.  Every invocation is appended to ``calls.log`` (``<epoch> <args>``), so a test can
tell that, and when, a host was polled (:func:`calls`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

QUERY_GPU = "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu"
QUERY_APPS = "--query-compute-apps=gpu_uuid,pid,used_memory"
FORMAT = "--format=csv,noheader,nounits"
DEFAULT_NAME = "NVIDIA A100-SXM4-80GB"
DEFAULT_TOTAL_MB = 81920
GARBAGE = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)

# $HOME is the host's home on SSH sessions and in SshHost.exec; the fallback is baked in by
# install() so the script still finds its files if something runs it without HOME.
SCRIPT = r"""#!/bin/sh
# Fake nvidia-smi (tests/harness/fakegpu.py): prints state files the test controls.
d="${HOME:-@HOME@}/fakegpu"
printf '%s %s\n' "$(date +%s.%N)" "$*" >> "$d/calls.log" 2>/dev/null
if [ -e "$d/garbage" ]; then
    cat "$d/garbage"
    exit 9
fi
if [ "$#" -eq 2 ] && [ "$2" = "@FORMAT@" ]; then
    case "$1" in
        "@QUERY_GPU@") cat "$d/gpus.csv"; exit $? ;;
        "@QUERY_APPS@") cat "$d/apps.csv"; exit $? ;;
    esac
fi
echo "fake nvidia-smi: unsupported arguments: $*" >&2
echo "(only the two csv queries Labsite makes are answered; see tests/harness/fakegpu.py)" >&2
exit 2
"""


def state_dir(host: Any) -> Path:
    return Path(host.home) / "fakegpu"


def _bin_path(host: Any) -> Path:
    return Path(host.bin_dir) / "nvidia-smi"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def gpu_uuid(host_index: int, i: int) -> str:
    """A stable UUID in nvidia-smi's shape, unique per (host, GPU)."""
    return f"GPU-{host_index:08x}-{i:04x}-4000-8000-{0xFA6E0000 + host_index:012x}"


def gpu_rows(n: int, host_index: int, **overrides: Any) -> list[dict[str, Any]]:
    """``n`` idle GPUs (index 0..n-1) with UUIDs unique to ``host_index``."""
    return [
        {
            "index": i,
            "uuid": gpu_uuid(host_index, i),
            "name": DEFAULT_NAME,
            "total": DEFAULT_TOTAL_MB,
            "used": 4,
            "util": 0,
            **overrides,
        }
        for i in range(n)
    ]


def format_gpus(gpus: Iterable[Mapping[str, Any]]) -> str:
    lines = []
    for g in gpus:
        lines.append(
            ", ".join(
                str(x)
                for x in (
                    g["index"],
                    g["uuid"],
                    g.get("name", DEFAULT_NAME),
                    g.get("total", DEFAULT_TOTAL_MB),
                    g.get("used", 4),
                    g.get("util", 0),
                )
            )
        )
    return "".join(line + "\n" for line in lines)


def format_apps(apps: Iterable[Mapping[str, Any]]) -> str:
    return "".join(f"{a['uuid']}, {int(a['pid'])}, {int(a['used'])}\n" for a in apps)


def set_gpus(host: Any, gpus: Iterable[Mapping[str, Any]]) -> None:
    _write_atomic(state_dir(host) / "gpus.csv", format_gpus(gpus))


def set_apps(host: Any, apps: Iterable[Mapping[str, Any]] = ()) -> None:
    _write_atomic(state_dir(host) / "apps.csv", format_apps(apps))


def install(
    host: Any, gpus: Iterable[Mapping[str, Any]], apps: Iterable[Mapping[str, Any]] = ()
) -> str:
    """State files first, then the script (so the first call already sees them); host path."""
    d = state_dir(host)
    d.mkdir(parents=True, exist_ok=True)
    (d / "garbage").unlink(missing_ok=True)
    set_gpus(host, gpus)
    set_apps(host, apps)
    script = (
        SCRIPT.replace("@HOME@", str(host.home))
        .replace("@FORMAT@", FORMAT)
        .replace("@QUERY_GPU@", QUERY_GPU)
        .replace("@QUERY_APPS@", QUERY_APPS)
    )
    return host.write_bin("nvidia-smi", script)


def garbage(host: Any, text: str = GARBAGE) -> None:
    """From now on nvidia-smi prints ``text`` (on stdout, as the real one) and exits 9."""
    if not _bin_path(host).exists():
        install(host, [])
    _write_atomic(state_dir(host) / "garbage", text + "\n")


def heal(host: Any) -> None:
    """Undo :func:`garbage`: the state files answer again."""
    (state_dir(host) / "garbage").unlink(missing_ok=True)


def remove(host: Any) -> None:
    """No nvidia-smi on the host's PATH (this machine has none outside the test bin dirs)."""
    _bin_path(host).unlink(missing_ok=True)


def calls(host: Any) -> list[tuple[float, str]]:
    """Every invocation so far: (epoch seconds, arguments as one string)."""
    try:
        text = (state_dir(host) / "calls.log").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        stamp, _, args = line.partition(" ")
        try:
            out.append((float(stamp), args))
        except ValueError:
            continue  # a line being written
    return out


def start_foreign_process(host: Any, seconds: int = 3600) -> int:
    """A real process on the host that is not Labsite's (no LABSITE_RUN_ID): its pid.

    It lives in the host's network namespace, so the lab's teardown kills it.
    """
    p = host.exec(
        f"env -u LABSITE_RUN_ID setsid nohup sleep {int(seconds)} "
        "</dev/null >/dev/null 2>&1 & echo $!",
        check=True,
    )
    pid = int(p.stdout.strip())
    deadline = time.monotonic() + 5
    while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host.name}: the foreign process {pid} did not start")
        time.sleep(0.01)
    return pid


def query(host: Any, *args: str) -> subprocess.CompletedProcess:
    """Run the host's nvidia-smi with ``args`` as an SSH session would see it."""
    return host.exec("nvidia-smi " + " ".join(shlex.quote(a) for a in args), check=False)
