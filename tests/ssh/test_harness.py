"""The SSH test-host harness itself works: real sshd, real namespaces, real failures."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest

from tests.harness.sshhosts import (
    SshLab,
    link_names,
    netns_list,
    paramiko_connect,
    pid_alive,
    ssh_run,
)

LabFactory = Callable[..., SshLab]


def _start_detached_sleep(client: paramiko.SSHClient) -> int:
    code, out, err = ssh_run(client, "setsid nohup sleep 300 </dev/null >/dev/null 2>&1 & echo $!")
    assert code == 0, err
    pid = int(out.strip())
    # setsid execs in place (a background child of a non-interactive sh leads no group).
    deadline = time.monotonic() + 2
    while Path(f"/proc/{pid}/cmdline").read_bytes() != b"sleep\x00300\x00":
        assert time.monotonic() < deadline, "detached sleep did not start"
        time.sleep(0.01)
    return pid


def test_each_host_answers_with_its_own_name(ssh_lab: SshLab) -> None:
    assert [h.name for h in ssh_lab] == ["lshost1", "lshost2"]
    assert len({h.ip for h in ssh_lab}) == 2
    for host in ssh_lab:
        with paramiko_connect(host) as client:
            code, out, _ = ssh_run(client, 'hostname; echo "$HOME"; id -u')
        assert code == 0
        assert out.split() == [host.name, host.home, "0"]
        assert host.exec("hostname").stdout.strip() == host.name


def test_bin_dir_is_usr_local_bin_on_that_host_only(ssh_lab: SshLab) -> None:
    h1, h2 = ssh_lab.hosts
    name = f"fake-{uuid.uuid4().hex[:8]}"
    target = Path(h1.bin_dir) / name
    target.write_text("#!/bin/sh\necho fake on $(hostname)\n")
    target.chmod(0o755)
    try:
        with paramiko_connect(h1) as c1, paramiko_connect(h2) as c2:
            assert ssh_run(c1, f"command -v {name}")[1].strip() == f"/usr/local/bin/{name}"
            assert ssh_run(c1, name)[1].strip() == "fake on lshost1"
            code, out, _ = ssh_run(c2, f"command -v {name} || ls /usr/local/bin/{name}")
            assert code != 0 and out == ""
        assert h1.exec(name).stdout.strip() == "fake on lshost1"  # exec() sees the same mounts
        assert not Path("/usr/local/bin", name).exists()  # the real machine is untouched
    finally:
        target.unlink()


def test_home_is_per_host_with_empty_bashrc(ssh_lab: SshLab) -> None:
    for host in ssh_lab:
        assert Path(host.home, ".bashrc").read_text() == ""
        assert Path(host.run_root).is_dir()
        with paramiko_connect(host) as client:
            # /root is the same directory as HOME (bind mount): nothing leaks into the real /root.
            code, out, _ = ssh_run(
                client, 'pwd; echo x > ./marker; cat "$HOME/marker"; echo $PYENV_ROOT'
            )
        assert code == 0
        assert out.split() == ["/root", "x"]
        assert Path(host.home, "marker").read_text() == "x\n"
        Path(host.home, "marker").unlink()


def test_sftp_subsystem(ssh_lab: SshLab) -> None:
    host = ssh_lab.hosts[0]
    with paramiko_connect(host) as client, client.open_sftp() as sftp:
        with sftp.open(f"{host.home}/sftp.txt", "w") as f:
            f.write("via sftp")
    assert Path(host.home, "sftp.txt").read_text() == "via sftp"
    Path(host.home, "sftp.txt").unlink()


def test_exec_latency_on_open_connection(ssh_lab: SshLab) -> None:
    host = ssh_lab.hosts[0]
    results = {}
    for nodelay in (True, False):
        t0 = time.perf_counter()
        client = paramiko_connect(host, nodelay=nodelay)
        connect_s = time.perf_counter() - t0
        try:
            for _ in range(3):
                assert ssh_run(client, "true")[0] == 0
            samples = []
            for _ in range(20):
                t0 = time.perf_counter()
                _, out, _ = client.exec_command("true")
                assert out.channel.recv_exit_status() == 0
                samples.append(time.perf_counter() - t0)
        finally:
            client.close()
        results[nodelay] = statistics.median(samples)
        print(
            f"\n[ssh latency] TCP_NODELAY={nodelay}: connect {connect_s * 1000:.1f} ms, "
            f"exec_command('true') median {results[nodelay] * 1000:.1f} ms "
            f"(min {min(samples) * 1000:.1f}, max {max(samples) * 1000:.1f})"
        )
    assert results[True] < 0.030


def test_detached_process_survives_disconnect_and_sshd_restart(fresh_lab: LabFactory) -> None:
    lab = fresh_lab(n_hosts=1)
    host = lab.hosts[0]
    with paramiko_connect(host) as client:
        pid = _start_detached_sleep(client)
    old_sshd = host.sshd_pid
    assert pid in host.pids()
    time.sleep(0.3)
    assert pid_alive(pid), "detached process died with the SSH connection"

    t0 = time.perf_counter()
    host.restart_sshd()
    print(f"\n[ssh] restart_sshd took {(time.perf_counter() - t0) * 1000:.0f} ms")
    assert host.sshd_pid != old_sshd and old_sshd is not None and not pid_alive(old_sshd)
    assert pid_alive(pid), "detached process died with sshd"
    with paramiko_connect(host) as client:
        assert ssh_run(client, f"kill -0 {pid} && hostname")[1].strip() == host.name


def test_link_down_cuts_the_host_off_and_up_restores_it(fresh_lab: LabFactory) -> None:
    lab = fresh_lab(n_hosts=2)
    h1, h2 = lab.hosts
    with paramiko_connect(h1) as client:
        assert ssh_run(client, "true")[0] == 0
    h1.link_down()
    t0 = time.perf_counter()
    with pytest.raises((OSError, paramiko.SSHException)):
        paramiko_connect(h1, timeout=2).close()
    print(f"\n[ssh] connect to a downed link failed after {time.perf_counter() - t0:.2f} s")
    with paramiko_connect(h2) as client:  # the other host is unaffected
        assert ssh_run(client, "hostname")[1].strip() == h2.name
    h1.link_up()
    t0 = time.perf_counter()
    with paramiko_connect(h1, timeout=5) as client:
        assert ssh_run(client, "hostname")[1].strip() == h1.name
    print(f"[ssh] first connect after link_up took {(time.perf_counter() - t0) * 1000:.0f} ms")


def test_rotated_host_key_is_rejected_when_old_key_pinned(fresh_lab: LabFactory) -> None:
    host = fresh_lab(n_hosts=1).hosts[0]
    old_public, old_fp = host.host_key_public, host.host_key_fingerprint
    assert old_fp.startswith("SHA256:") and len(old_fp) == 7 + 43
    with paramiko_connect(host) as client:
        key = client.get_transport().get_remote_server_key()  # type: ignore[union-attr]
        assert key.fingerprint == old_fp  # same form as OpenSSH prints
    assert host.rotate_host_key() == old_fp
    assert host.host_key_fingerprint != old_fp
    with pytest.raises(paramiko.BadHostKeyException):
        paramiko_connect(host, host_key=old_public)
    with paramiko_connect(host) as client:
        key = client.get_transport().get_remote_server_key()  # type: ignore[union-attr]
        assert key.fingerprint == host.host_key_fingerprint


def test_teardown_leaves_nothing_behind() -> None:
    t0 = time.perf_counter()
    lab = SshLab(n_hosts=2).start()
    start_s = time.perf_counter() - t0
    print(f"\n[ssh] SshLab(n_hosts=2) started in {start_s * 1000:.0f} ms")
    assert start_s < 5
    try:
        sleepers = []
        for host in lab:
            with paramiko_connect(host) as client:
                sleepers.append(_start_detached_sleep(client))
        namespaces = [h.ns for h in lab]
        links = [lab.bridge] + [h.veth_root for h in lab]
        sshd_pids = [h.sshd_pid for h in lab]
        anchors = [h.anchor_pid for h in lab]
        all_pids = [p for h in lab for p in h.pids()]
        assert set(namespaces) <= set(netns_list())
        assert set(links) <= set(link_names())
        assert all(p is not None and pid_alive(p) for p in sshd_pids + anchors + sleepers)
        lab_dir = lab.dir
    finally:
        t0 = time.perf_counter()
        lab.close()
    print(f"[ssh] SshLab.close() took {(time.perf_counter() - t0) * 1000:.0f} ms")
    assert not set(namespaces) & set(netns_list())
    assert not set(links) & set(link_names())
    alive = [
        p for p in [*sshd_pids, *anchors, *sleepers, *all_pids] if p is not None and pid_alive(p)
    ]
    assert alive == []
    assert not lab_dir.exists()
    lab.close()  # idempotent


def test_failed_start_cleans_up_partial_setup() -> None:
    lab = SshLab(n_hosts=2, sshd="/bin/false")
    with pytest.raises(RuntimeError, match="sshd exited"):
        lab.start()
    assert lab.bridge and len(lab.hosts) == 2  # it got as far as the hosts
    assert not {h.ns for h in lab} & set(netns_list())
    assert not ({lab.bridge} | {h.veth_root for h in lab}) & set(link_names())
    assert not any(h.anchor_pid and pid_alive(h.anchor_pid) for h in lab)
    assert not lab.dir.exists()
    lab.close()
    SshLab(n_hosts=1).close()  # never started: a no-op
