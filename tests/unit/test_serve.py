"""serve's watcher thread: started again, after a back-off, when it dies (as a child process is)."""

from __future__ import annotations

import time

from experiments import watcher
from labsite.management.commands import serve


def test_the_watcher_thread_is_started_again_when_it_dies(monkeypatch):
    calls: list[float] = []

    def dies(stop):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        raise RuntimeError("the database went away")

    monkeypatch.setattr(watcher, "watch_forever", dies)
    watching = serve.WatcherThread()
    watching.start()
    assert watching.thread is not None
    watching.thread.join(5)
    now = time.monotonic()
    line = watching.check(now)
    assert line is not None and "the watcher stopped; restarting it in 1 s" in line
    assert watching.check(now + 0.5) is None and len(calls) == 1, "not before its back-off"
    watching.check(now + 1.01)
    watching.thread.join(5)
    assert len(calls) == 2, "started again"
    assert "restarting it in 2 s" in (watching.check(time.monotonic()) or ""), "backs off"
    watching.stop()
    assert watching.check(time.monotonic() + 10) is None
    assert len(calls) == 2, "a stopped serve starts no watcher"
