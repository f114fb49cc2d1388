"""Runs on real sshd hosts in network namespaces, driven by a real worker (with beat)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from clusters.models import Host
from experiments.models import Alert, Run, RunEvent
from tests.harness.api import TERMINAL, create, ended, register, wait_probed
from tests.harness.worker import wait_for


def run_dir(host, run_id: str) -> Path:
    return Path(host.home) / ".labsite" / "runs" / run_id


@pytest.fixture
def lab(fresh_lab, celery_worker, admin):
    lab = fresh_lab(n_hosts=2)
    for host in lab:
        assert register(admin, host)["host_key_fingerprint"] == host.host_key_fingerprint
    return lab


def test_a_hosts_cores_and_memory_are_read_by_its_poll_over_ssh(lab, member):
    """The CPU slots a host offers default to the cores its poll reads (over sshd, as the
    host's user): here the machine's own, which the namespace hosts share."""
    import os

    name = lab[0].name
    row = wait_for(
        lambda: (h := member.client.get(f"/api/hosts/{name}").json())["cpu_count"] and h,
        30,
        what="the host's core count",
    )
    assert row["cpu_count"] == len(os.sched_getaffinity(0))
    assert row["memory_mb"] and row["memory_mb"] > 100
    assert row["cpu_slots"] == 16, "the admin's override, set at registration, is kept"


def test_registration_pins_the_key_and_probe_reports_online(lab, admin, member):
    host = Host.objects.get(name=lab[0].name)
    assert host.state == "online" and host.host_key_fingerprint == lab[0].host_key_fingerprint
    # The request only asks a worker to probe: 202 at once, then the client polls the host.
    asked = member.client.post(f"/api/hosts/{host.name}/probe")
    assert asked.status_code == 202, asked.content
    assert asked.json()["probe"]["poll"] == f"/api/hosts/{host.name}"
    probed = wait_probed(member.client, host.name, after=asked.json()["probe"]["requested_at"])
    assert probed["state"] == "online" and probed["last_seen_at"]
    listed = member.client.get("/api/hosts").json()
    assert "identity_file" not in str(listed) and Path(lab[0].key_path).name not in str(listed)
    assert (
        member.client.post("/api/hosts", {"name": "x", "hostname": "h"}, format="json").status_code
        == 403
    )


def test_a_given_fingerprint_is_checked_not_trusted(fresh_lab, celery_worker, admin):
    host = fresh_lab(n_hosts=1)[0]
    wrong = "SHA256:" + "A" * 43
    body = register(admin, host, host_key_fingerprint=wrong)
    assert body["state"] == "key_mismatch" and body["host_key_fingerprint"] == wrong
    assert Alert.objects.filter(message__contains=host.name, severity="critical").exists()


def test_runs_on_a_host_exit_codes_logs_and_quoting(lab, member):
    h = lab[0]
    ok = create(member.client, h, name="ok", command="hostname; echo out; echo err >&2")
    bad = create(
        member.client,
        h,
        name="bad $(reboot)",
        command="exit 7",
        env={"X": "'; touch /tmp/nope-$$ #"},
    )
    killed = create(member.client, h, name="killed", command="kill -9 $$")
    assert (r := ended(ok)).status == "finished" and r.exit_code == 0 and r.host.name == h.name
    content = member.client.get(f"/api/runs/{ok}/logs").json()["content"]
    assert content.splitlines() == [h.name, "out", "err"]
    assert (r := ended(bad)).status == "failed" and r.exit_code == 7 and r.reason == "exit_code"
    assert (r := ended(killed)).status == "failed" and r.exit_code == 137
    assert (run_dir(h, ok) / "exit_code").read_text().strip() == "0"
    assert not any(Path("/tmp").glob("nope-*"))


def test_stop_over_ssh_leaves_no_process_behind(lab, member):
    h = lab[1]
    command = "trap '' TERM; (setsid sh -c 'trap \"\" TERM; sleep 600') & sleep 600 & echo up; wait"
    run_id = create(member.client, h, name="stubborn", command=command)
    wait_for(lambda: "up" in member.client.get(f"/api/runs/{run_id}/logs").json()["content"], 60)
    assert member.client.post(f"/api/runs/{run_id}/stop").status_code == 200
    assert ended(run_id).status == "stopped"
    marker = f"LABSITE_RUN_ID={run_id}"
    left = h.exec(f"grep -lsza -x {marker} /proc/[0-9]*/environ | wc -l").stdout.strip()
    assert left == "0"


def test_worker_killed_mid_dispatch_launches_each_run_once(lab, member, celery_worker):
    """GIVEN 50 runs being dispatched WHEN the worker is kill -9'd and restarted
    THEN every run started exactly once on its host and all finished."""
    h = lab[0]
    ids = [
        create(
            member.client, h, name=f"burst-{i}", command="echo $LABSITE_RUN_ID >> ~/starts; sleep 1"
        )
        for i in range(50)
    ]
    wait_for(
        lambda: Run.objects.filter(pk__in=ids, status__in=["launching", "running"]).count() >= 5, 60
    )
    celery_worker.kill9()
    celery_worker.start()
    wait_for(lambda: Run.objects.filter(pk__in=ids, status__in=TERMINAL).count() == 50, 180, 0.5)
    starts = (Path(h.home) / "starts").read_text().split()
    assert sorted(starts) == sorted(ids), "each run started exactly once"
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"finished"}
    for run_id in ids:  # one placement each; "running" is skipped if it had ended when polled
        events = list(RunEvent.objects.filter(run_id=run_id).values_list("to_status", flat=True))
        assert events.count("launching") == 1 and events.count("running") <= 1, events


def test_sshd_restart_and_a_cut_link_fail_nothing(lab, member):
    h = lab[1]
    run_id = create(
        member.client,
        h,
        name="survivor",
        command="for i in $(seq 8); do echo tick $i; sleep 1; done; exit 5",
    )
    wait_for(lambda: Run.objects.get(pk=run_id).status == "running", 60)
    h.restart_sshd()
    time.sleep(1)
    h.link_down()
    wait_for(lambda: Run.objects.get(pk=run_id).reason == "host_unreachable", 60)
    time.sleep(2)  # longer than a poll interval, while the run goes on out there
    assert Run.objects.get(pk=run_id).status == "running"
    h.link_up()
    run = ended(run_id, timeout=90)
    assert run.status == "failed" and run.exit_code == 5 and run.reason == "exit_code"
    content = member.client.get(f"/api/runs/{run_id}/logs").json()["content"]
    assert content.splitlines() == [f"tick {i}" for i in range(1, 9)]


def test_a_changed_host_key_is_refused_and_nothing_runs(lab, member, admin):
    h = lab[0]
    old = h.host_key_fingerprint
    h.rotate_host_key()
    # A key changes with a reinstall or a reboot, which also ends the open sessions.
    for pid in h.pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if cmdline.startswith(b"sshd:") and b"listener" not in cmdline:
            os.kill(pid, signal.SIGKILL)
    run_id = create(member.client, h, name="must-not-run", command="touch ~/executed")
    host = wait_for(lambda: (x := Host.objects.get(name=h.name)).state == "key_mismatch" and x, 60)
    assert host.host_key_fingerprint == old
    alert = wait_for(
        lambda: Alert.objects.filter(message__contains=h.name, severity="critical").first()
    )
    assert h.host_key_fingerprint in alert.message
    time.sleep(2)
    assert not (Path(h.home) / "executed").exists() and not run_dir(h, run_id).exists()
    # Refused before or at launch: it waits (queued, or launching if placed before the poll saw
    # the new key) and nothing reached the host.
    assert Run.objects.get(pk=run_id).status in {"queued", "launching"}
    # An admin checks the new key out of band, accepts it, and the run goes.
    accepted = admin.client.post(
        f"/api/hosts/{h.name}/accept-key", {"fingerprint": h.host_key_fingerprint}, format="json"
    )
    assert accepted.status_code == 202, accepted.content
    probed = wait_probed(admin.client, h.name, after=accepted.json()["probe"]["requested_at"])
    assert probed["state"] == "online"
    assert ended(run_id).status == "finished" and (Path(h.home) / "executed").exists()


def test_a_vanished_process_is_lost(lab, member):
    h = lab[0]
    run_id = create(member.client, h, name="doomed", command="echo up; sleep 600")
    wait_for(lambda: "up" in member.client.get(f"/api/runs/{run_id}/logs").json()["content"], 60)
    pgid = Run.objects.get(pk=run_id).pid
    killed = h.exec(f"/bin/kill -KILL -- -{pgid}")  # the OOM killer or a reboot: no exit code
    assert killed.returncode == 0, killed.stderr
    run = ended(run_id)
    assert run.status == "failed" and run.reason == "lost" and run.exit_code is None


def test_an_uploaded_key_is_stored_0600_and_never_shown(fresh_lab, celery_worker, admin, settings):
    h = fresh_lab(n_hosts=1)[0]
    key_text = Path(h.key_path).read_text()
    response = admin.client.post(
        "/api/hosts",
        {
            "name": h.name,
            "hostname": h.ip,
            "username": "root",
            "private_key": key_text,
        },
        format="json",
    )
    assert response.status_code == 202, response.content
    assert "PRIVATE KEY" not in response.content.decode()
    body = wait_probed(admin.client, h.name)
    assert body["state"] == "online" and body["has_identity"] is True
    stored = Path(settings.DATA_DIR) / "keys" / f"{h.name}.key"
    assert stored.read_text().strip() == key_text.strip()
    assert stored.stat().st_mode & 0o777 == 0o600
    bad = admin.client.post(
        "/api/hosts", {"name": "bad", "hostname": h.ip, "private_key": "nope"}, format="json"
    )
    assert bad.status_code == 400 and not Host.objects.filter(name="bad").exists()


def test_add_host_command_pins_and_prints_the_fingerprint(fresh_lab, transactional_db):
    from io import StringIO

    from django.core.management import CommandError, call_command

    h = fresh_lab(n_hosts=1)[0]
    out = StringIO()
    call_command(
        "add_host",
        h.name,
        "--hostname",
        h.ip,
        "--username",
        "root",
        "--identity-file",
        str(h.key_path),
        stdout=out,
    )
    assert out.getvalue().strip() == f"{h.name}: online, host key {h.host_key_fingerprint}"
    assert Host.objects.get(name=h.name).host_key_fingerprint == h.host_key_fingerprint
    with pytest.raises(CommandError, match="changed"):
        call_command(
            "add_host",
            "other",
            "--hostname",
            h.ip,
            "--username",
            "root",
            "--identity-file",
            str(h.key_path),
            "--fingerprint",
            "SHA256:" + "B" * 43,
        )
    assert not Host.objects.filter(name="other").exists()


def test_a_launching_run_is_stopped_and_never_starts(lab, member):
    """GIVEN a host cut off, so a run cannot leave `launching` WHEN it is stopped and the host
    comes back THEN it ends `stopped` and its command never ran."""
    h = lab[1]
    h.link_down()
    run_id = create(member.client, h, name="late", command="touch ~/late-executed")
    wait_for(lambda: Run.objects.get(pk=run_id).status == "launching", 60)
    body = member.client.post(f"/api/runs/{run_id}/stop").json()
    assert body["status"] == "launching" and body["stop_requested_at"]
    h.link_up()
    assert ended(run_id, timeout=90).status == "stopped"
    time.sleep(2)
    assert not (Path(h.home) / "late-executed").exists()


def test_a_50_mb_log_over_ssh_arrives_whole_with_its_bytes(lab, member, settings):
    h = lab[0]
    command = (
        "head -c 50000000 /dev/zero | tr '\\0' x | fold -w 100; echo; "
        "printf 'caf\\xc3\\xa9 \\xff\\xfe\\n'; echo END"
    )
    run_id = create(member.client, h, name="big-ssh", command=command)
    assert ended(run_id, timeout=240).status == "finished"
    body = member.client.get(f"/api/runs/{run_id}/logs", {"offset": -20}).json()
    assert body["total_size"] == 50_000_000 + 499_999 + 1 + 9 + 4
    assert body["content"].endswith("café \ufffd\ufffd\nEND\n")
    raw = (Path(settings.DATA_DIR) / "logs" / f"{run_id}.log").read_bytes()
    assert raw == (run_dir(h, run_id) / "output.log").read_bytes()


def test_a_hosts_own_python_setup_cannot_break_the_poll(lab, member):
    """GIVEN a host whose user site-packages hold a .pth that kills any Python started with
    `site` (a conda env or a lab member's packages can do worse) WHEN a run runs there THEN the
    poll (Python started isolated, without site) still sees it finish."""
    h = lab[0]
    version = h.exec(
        "python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'", check=True
    ).stdout.strip()
    user_site = Path(h.home) / ".local" / "lib" / f"python{version}" / "site-packages"
    user_site.mkdir(parents=True)
    (user_site / "zz-broken.pth").write_text("import os; os._exit(3)\n")
    assert h.exec("python3 -c pass").returncode == 3  # the trap works on a plain python3
    run_id = create(member.client, h, name="pth", command="echo fine")
    run = ended(run_id, timeout=60)
    assert run.status == "finished" and run.exit_code == 0, (run.status, run.error)


def test_a_host_with_2_cpu_slots_never_runs_more_than_2_one_cpu_runs_at_once(lab, member):
    """Counted on the host itself: each run writes when it starts and ends to a file there;
    6 one-CPU runs pinned to a 2-slot host never overlap more than 2 deep, and the ones that
    wait say the CPU slots are why."""
    h = lab[1]
    Host.objects.filter(name=h.name).update(cpu_slots=2)
    stamps = Path(h.home) / "overlap.log"
    stamps.unlink(missing_ok=True)
    command = (
        f'echo "$(date +%s.%N) 1" >> {stamps}; sleep 1.5; echo "$(date +%s.%N) -1" >> {stamps}'
    )
    ids = [create(member.client, h, name=f"slot-{i}", command=command) for i in range(6)]
    reasons = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rows = list(Run.objects.filter(pk__in=ids).values_list("status", "waiting_reason"))
        reasons |= {why for status, why in rows if status == "queued"}
        if all(status in TERMINAL for status, _ in rows):
            break
        time.sleep(0.2)
    assert [ended(i).status for i in ids] == ["finished"] * 6
    events = sorted(
        (float(at), int(step))
        for at, step in (line.split() for line in stamps.read_text().split("\n") if line)
    )
    assert len(events) == 12
    depth = deepest = 0
    for _, step in events:
        depth += step
        deepest = max(deepest, depth)
    assert deepest == 2, f"{deepest} runs ran at once on a 2-slot host"
    assert any("0 of 2 CPU slots free on " + h.name in why for why in reasons), reasons
