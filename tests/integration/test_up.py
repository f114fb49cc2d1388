"""`make up`'s last steps for real: migrate, bootstrap, then web + worker + beat + watcher."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.harness.worker import ROOT, redis_test_client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )


def test_serve_runs_site_worker_beat_and_watcher_and_one_ctrl_c_stops_them(tmp_path):
    """GIVEN a fresh data dir (SQLite) WHEN bootstrap then serve THEN the site answers, the first
    admin's password is printed once, the watcher follows the local host, and SIGINT stops web,
    worker, beat and watcher."""
    redis_test_client()  # asserts the test Redis db is not db 0
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(
        LABSITE_DATA_DIR=str(tmp_path),
        PYTHONUNBUFFERED="1",
        WEB_CONCURRENCY="1",
        WORKER_CONCURRENCY="1",
    )
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput", "-v0"], env=env, check=True, timeout=300)
    first = subprocess.run(
        [*manage, "bootstrap"], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert "Username: admin  Password: " in first.stdout
    again = subprocess.run(
        [*manage, "bootstrap"], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert "Password" not in again.stdout, "credentials are printed once only"
    assert (tmp_path / "labsite.sqlite3").exists() and (
        tmp_path / "secret_key"
    ).stat().st_mode & 0o077 == 0

    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [*manage, "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    children: list[int] = []
    try:
        url = f"http://127.0.0.1:{port}/api/wild/v2/system-health"
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline and body is None:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                body = json.loads(urllib.request.urlopen(url, timeout=2).read())  # noqa: S310
            except OSError:
                time.sleep(0.3)
        assert body is not None and body["status"] == "ok"
        login = urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5)  # noqa: S310
        assert b"csrfmiddlewaretoken" in login.read()
        children = [
            int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
        assert len(children) == 4, "web, worker, beat and watcher"
        deadline = time.monotonic() + 30
        text = ""
        up = ("ready.", "beat: Starting", "watching local")
        while time.monotonic() < deadline and not all(marker in text for marker in up):
            text = (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        assert "ready." in text, "the worker did not come up"
        assert "beat: Starting" in text, "beat did not come up"
        assert "watching local" in text, "the watcher does not follow the local host"
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(c) for c in children):
            time.sleep(0.2)
        assert not any(alive(c) for c in children), "a child outlived Ctrl-C"
    finally:
        for pid in [proc.pid, *children]:
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
        log.close()
