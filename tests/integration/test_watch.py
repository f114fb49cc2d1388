"""The watch stream on the server itself: a run's end is reported as it happens, and closing the
stream leaves no follower behind. (The same over sshd, and the wake-up of the poll that follows,
are in tests/ssh/test_watch.py.)"""

from __future__ import annotations

import time
from pathlib import Path

from clusters.executors import WATCH_ALIVE, Executor, LaunchSpec, LocalTransport


def followers(marker: str) -> list[int]:
    """Processes whose command line names this test's run root (the stream's `tail -F`)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def wait_for_followers(marker: str, timeout: float = 5.0) -> list[int]:
    """The followers once there are any: the ready line comes right after bash forks the
    `tail`, and the child may not have exec'd it yet (nothing is missed meanwhile: tail starts
    from the size measured before the ready line)."""
    deadline = time.monotonic() + timeout
    while not (found := followers(marker)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def next_event(stream, timeout: float = 10.0) -> tuple[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline(0.5)
        if line is not None and line != WATCH_ALIVE:
            return line, time.monotonic()
    raise AssertionError("no run end was reported")


def test_a_local_run_end_is_streamed_at_once_and_close_stops_the_follower(tmp_path):
    root = str(tmp_path / "runs")
    executor = Executor(LocalTransport())
    stream = executor.watch(root, heartbeat_seconds=1)
    try:
        assert wait_for_followers(root), "the stream follows the events file"
        executor.launch(LaunchSpec(run_id="w1", command="sleep 0.3", run_root=root))
        executor.launch(LaunchSpec(run_id="w2", command="exit 3", run_root=root, dir_name="w2-a2"))
        seen = dict([next_event(stream), next_event(stream)])
        assert set(seen) == {"w1", "w2-a2"}
        ended = Path(root, "w1", "exit_code").stat().st_mtime
        reported = seen["w1"] - time.monotonic() + time.time()  # as wall-clock time
        assert reported - ended < 1.0, "a run's end is reported within a second"
        assert stream.readline(2.5) == WATCH_ALIVE, "a quiet host still sends its heartbeat"
    finally:
        stream.close()
    deadline = time.monotonic() + 5
    while followers(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert followers(root) == [], "the follower outlived its stream"
