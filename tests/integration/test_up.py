"""`make up`'s last steps for real: migrate, bootstrap, then web + worker + beat + watcher."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.harness.worker import ROOT, redis_test_client

MANAGE = [sys.executable, str(ROOT / "manage.py")]


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


def serve_env(tmp_path: Path) -> dict[str, str]:
    """A fresh instance on SQLite in tmp_path, with a HOME of its own: what gunicorn would put
    under ~ (its control socket) shows up there, and never touches another instance's."""
    redis_test_client()  # asserts the test Redis db is not db 0
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "XDG_RUNTIME_DIR")}
    (tmp_path / "home").mkdir()
    env.update(
        HOME=str(tmp_path / "home"),
        LABSITE_DATA_DIR=str(tmp_path),
        PYTHONUNBUFFERED="1",
        WEB_CONCURRENCY="1",
        WORKER_CONCURRENCY="1",
    )
    return env


def start_serve(env: dict[str, str], tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    with (tmp_path / "serve.log").open("wb") as log:
        return subprocess.Popen(
            [*MANAGE, "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def serve_log(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text(errors="replace")


def health(port: int, timeout: float = 2) -> dict[str, object]:
    url = f"http://127.0.0.1:{port}/api/wild/v2/system-health"
    return dict(json.loads(urllib.request.urlopen(url, timeout=timeout).read()))  # noqa: S310


def wait_until_up(proc: subprocess.Popen[bytes], tmp_path: Path, port: int) -> None:
    """The site answers, and the worker, beat and watcher said they are up."""
    deadline = time.monotonic() + 60
    body = None
    while time.monotonic() < deadline and body is None:
        assert proc.poll() is None, serve_log(tmp_path)[-3000:]
        try:
            body = health(port)
        except OSError:
            time.sleep(0.3)
    assert body is not None and body["status"] == "ok"
    deadline = time.monotonic() + 30
    text = ""
    up = ("ready.", "beat: Starting", "watching local")
    while time.monotonic() < deadline and not all(marker in text for marker in up):
        text = serve_log(tmp_path)
        time.sleep(0.3)
    assert "ready." in text, "the worker did not come up"
    assert "beat: Starting" in text, "beat did not come up"
    assert "watching local" in text, "the watcher does not follow the local host"


def children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def kill_all(serve: subprocess.Popen[bytes], seen: list[int]) -> None:
    """Stop what a test started, by pid: serve, its children now and those it had before
    (each leads a process group of its own)."""
    now = children_of(serve.pid) if alive(serve.pid) else []
    for pid in [serve.pid, *now, *seen]:
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)
    serve.wait(10)


def test_serve_runs_site_worker_beat_and_watcher_and_one_ctrl_c_stops_them(tmp_path):
    """GIVEN a fresh data dir (SQLite) WHEN bootstrap then serve THEN the site answers, the first
    admin's password is printed once (and written to no file of the instance), the watcher
    follows the local host, gunicorn keeps no control socket under ~, and SIGINT stops web,
    worker, beat and watcher."""
    env = serve_env(tmp_path)
    subprocess.run([*MANAGE, "migrate", "--noinput", "-v0"], env=env, check=True, timeout=300)
    first = subprocess.run(
        [*MANAGE, "bootstrap"], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    shown = re.search(r"Username: admin  Password: (\S+)", first.stdout)
    assert shown is not None, first.stdout
    password = shown.group(1).encode()
    again = subprocess.run(
        [*MANAGE, "bootstrap"], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert "Password" not in again.stdout, "credentials are printed once only"
    assert (tmp_path / "labsite.sqlite3").exists() and (
        tmp_path / "secret_key"
    ).stat().st_mode & 0o077 == 0

    port = free_port()
    proc = start_serve(env, tmp_path, port)
    children: list[int] = []
    try:
        wait_until_up(proc, tmp_path, port)
        login = urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5)  # noqa: S310
        assert b"csrfmiddlewaretoken" in login.read()
        children = children_of(proc.pid)
        assert len(children) == 2, "web and worker (beat runs inside it, the watcher in serve)"
        # gunicorn's default control socket (~/.gunicorn/gunicorn.ctl) is one per Unix user:
        # another instance on the machine would take it over, and delete it when it stops.
        assert not (tmp_path / "home" / ".gunicorn").exists(), "gunicorn made a control socket"
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(c) for c in children):
            time.sleep(0.2)
        assert not any(alive(c) for c in children), "a child outlived Ctrl-C"
    finally:
        kill_all(proc, children)
    # The password belongs on the terminal only: no log or other file of the instance has it.
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and password in p.read_bytes()]
    assert not leaked, f"the first admin's password was written to {leaked}"
