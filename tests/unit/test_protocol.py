"""The run directory protocol: parsing hosts' answers, and parameters that reach the host's
scripts byte for byte. The scripts run for real here, with bash and python3 on a tmp dir
(LocalTransport, as the server's user); over sshd they are in tests/ssh."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from clusters import executors
from clusters.executors import (
    Executor,
    LaunchSpec,
    LocalTransport,
    ProtocolError,
    RunRef,
    bash_script,
    launch_input,
    launch_program,
    protocol,
    python_script,
)

# What poll.py printed for two runs and the GPUs on a test host (fake nvidia-smi), trimmed.
POLL_ANSWER = {
    "ok": 1,
    "runs": {
        "r1": {
            "pid": 48213,
            "state": "running",
            "exit_code": None,
            "started_at": 1796158949.94869,
            "log_size": 12,
            "log_offset": 0,
            "log_chunk": base64.b64encode(b"step 1 ok\n\xff\n").decode(),
            "metrics_offset": 21,
            "metrics_lines": ['{"step": 1, "loss": 3}'],
        },
        "r2": {
            "pid": None,
            "state": "missing",
            "exit_code": None,
            "started_at": None,
            "log_size": 0,
            "log_offset": 0,
            "log_chunk": "",
            "metrics_offset": 0,
            "metrics_lines": [],
        },
    },
    "gpu": {
        "query_gpu": "0, GPU-3f9c2a1e-7b4d-4c8e-9a2f-1d5e6b7c8a90, NVIDIA A100-SXM4-80GB, 81920, 4, 0\n",
        "query_apps": "GPU-3f9c2a1e-7b4d-4c8e-9a2f-1d5e6b7c8a90, 48213, 40960\n",
        "error": "",
        "pid_runs": {"48213": "r1"},
    },
}


def answer(**changes: object) -> str:
    """POLL_ANSWER with run r1's fields changed (a value of ... deletes the field)."""
    data = json.loads(json.dumps(POLL_ANSWER))
    for key, value in changes.items():
        if value is ...:
            del data["runs"]["r1"][key]
        else:
            data["runs"]["r1"][key] = value
    return json.dumps(data)


def test_a_real_looking_poll_answer_parses_into_reports_and_gpus():
    text = json.dumps(POLL_ANSWER)
    reports = protocol.parse_poll(text)
    assert reports["r1"] == protocol.RunReport(
        state="running",
        pid=48213,
        started_at=1796158949.94869,
        log_size=12,
        log_chunk=b"step 1 ok\n\xff\n",
        metrics_offset=21,
        metrics_lines=['{"step": 1, "loss": 3}'],
    )
    assert reports["r2"].state == "missing" and reports["r2"].pid is None
    gpu = protocol.parse_gpu(text)
    assert gpu is not None and gpu.pid_runs == {48213: "r1"}
    assert gpu.query_apps.startswith("GPU-3f9c2a1e")
    assert protocol.parse_gpu(json.dumps({**POLL_ANSWER, "gpu": None})) is None


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(POLL_ANSWER)[:-40],  # cut short (a connection dropped mid-answer)
        "",
        "Traceback (most recent call last):\n  File ...",
        json.dumps([POLL_ANSWER]),
        json.dumps({**POLL_ANSWER, "ok": 0}),
        json.dumps({k: v for k, v in POLL_ANSWER.items() if k != "ok"}),
        json.dumps({k: v for k, v in POLL_ANSWER.items() if k != "runs"}),
        json.dumps({**POLL_ANSWER, "runs": [1, 2]}),
        json.dumps({**POLL_ANSWER, "runs": {"r1": "running"}}),
        json.dumps({**POLL_ANSWER, "gpu": ["0, GPU-1"]}),
        answer(state=...),
        answer(log_chunk=...),
        answer(metrics_lines=...),
        answer(pid="48213"),
        answer(pid=True),
        answer(exit_code=1.5),
        answer(started_at="yesterday"),
        answer(log_size=None),
        answer(log_chunk=17),
        answer(log_chunk="not base64!"),
        answer(metrics_lines="{}"),
        answer(metrics_lines=[1, 2]),
        answer(state="zombie"),
    ],
)
def test_a_malformed_poll_answer_is_a_protocol_error_with_a_short_excerpt(text):
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_poll(text)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    "gpu",
    [
        {"query_gpu": "", "query_apps": "", "error": ""},
        {"query_gpu": 0, "query_apps": "", "error": "", "pid_runs": {}},
        {"query_gpu": "", "query_apps": "", "error": "", "pid_runs": {"self": "r1"}},
        {"query_gpu": "", "query_apps": "", "error": "", "pid_runs": {"1": 2}},
        {"query_gpu": "", "query_apps": "", "error": "", "pid_runs": []},
    ],
)
def test_a_malformed_gpu_part_is_a_protocol_error(gpu):
    with pytest.raises(ProtocolError):
        protocol.parse_gpu(json.dumps({**POLL_ANSWER, "gpu": gpu}))


@pytest.mark.parametrize(
    ("stdout", "pid"),
    [
        ("LABSITE_PID 4242\n", 4242),
        ("bash: warning: setlocale: LC_ALL: cannot change locale\nLABSITE_PID 7\n", 7),
        ("LABSITE_CANCELLED\n", None),
    ],
)
def test_launch_answers(stdout, pid):
    assert protocol.parse_launch(stdout) == pid


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        ("LABSITE_ERROR the wrapper did not start within 5 s\n", "the wrapper did not start"),
        ("LABSITE_PID four\n", "unexpected launch answer"),
        ("", "unexpected launch answer"),
        ("x" * 5000, "unexpected launch answer"),
    ],
)
def test_a_failed_or_garbled_launch_is_a_protocol_error(stdout, message):
    with pytest.raises(ProtocolError, match=message) as caught:
        protocol.parse_launch(stdout)
    assert len(str(caught.value)) < 400


def test_cancel_answers():
    assert protocol.parse_cancel("LABSITE_CANCEL term_left=2 left=0\n") == 0
    assert protocol.parse_cancel("noise\nLABSITE_CANCEL term_left=3 left=1\n") == 1
    with pytest.raises(ProtocolError):
        protocol.parse_cancel("bash: line 3: ps: command not found\n")


# The remote side, for real.

HOSTILE = 'it\'s "quoted"\n`touch canary-tick` $(touch canary-dollar) ${HOME} \\ %41 %%\t\x01'
# Not UTF-8: a str that carries bytes (os.fsdecode) reaches the host as those bytes.
RAW = os.fsdecode(b"\xff\xfe latin-1 \xe9")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def run_bash(text: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["bash", "-s"], input=text.encode(), capture_output=True, cwd=cwd)


def test_bash_parameters_arrive_byte_for_byte_and_are_never_run(tmp_path):
    values = {
        "hostile": HOSTILE.encode(),
        "raw": os.fsencode(RAW),
        "empty": b"",
        "trailing": b"two newlines\n\n",
        "every_byte": bytes(range(1, 256)),
        "big": b'x"y\n' * 25_000,
    }
    driver = "params || exit 9\n" + "".join(
        f'emit {name} > {name}.out || exit 8\nvalue v {name} && printf %s "$v" > {name}.var\n'
        for name in values
    )
    line = protocol.bash_params_line(values)
    on_stdin = run_bash(line + executors.source("params.sh") + driver, tmp_path)
    # The launch's way: the program on bash's command line, the parameters alone on stdin.
    (tmp_path / "argv").mkdir()
    on_argv = subprocess.run(
        ["bash", "-c", executors.source("params.sh") + driver],
        input=line.removeprefix(protocol.PARAMS_ASSIGNMENT).encode(),
        capture_output=True,
        cwd=tmp_path / "argv",
    )
    for done, where in [(on_stdin, tmp_path), (on_argv, tmp_path / "argv")]:
        assert done.returncode == 0, done.stderr
        for name, value in values.items():
            assert (where / f"{name}.out").read_bytes() == value, name
            assert (where / f"{name}.var").read_bytes() == value, name
    assert not list(tmp_path.rglob("canary*")), "a parameter was run as shell"


def test_a_missing_or_malformed_bash_parameter_fails_instead_of_reading_empty(tmp_path):
    line = protocol.bash_params_line({"a": b"1"})
    prelude = executors.source("params.sh")
    assert run_bash(line + prelude + "params && value v b", tmp_path).returncode == 1
    for bad in ("LABSITE_PARAMS=notbase64!\n", "LABSITE_PARAMS=" + _b64('{"a":"1"') + "\n"):
        assert run_bash(bad + prelude + "params", tmp_path).returncode == 1, bad
    backslash = "LABSITE_PARAMS=" + _b64('{"a":"\\\\x41"}') + "\n"
    assert run_bash(backslash + prelude + "params", tmp_path).returncode == 1


def test_paths_take_tilde_as_the_users_home_and_are_made_absolute(tmp_path):
    prelude = executors.source("params.sh")
    for given, expected in [
        ("~/.labsite/runs/r1", "/home/u/.labsite/runs/r1"),
        ("~", "/home/u"),
        ("/abs/~/x", "/abs/~/x"),
        ("rel/x", f"{tmp_path}/rel/x"),
        ("~user/x", f"{tmp_path}/~user/x"),
    ]:
        line = protocol.bash_params_line({"dir": given.encode()})
        done = run_bash(
            line + prelude + 'HOME=/home/u\nparams && path d dir && printf %s "$d"', tmp_path
        )
        assert done.stdout.decode() == expected, given


def test_a_hostile_launch_runs_the_command_as_written_in_its_workdir_with_its_env(tmp_path):
    workdir = tmp_path / 'it\'s a "dir"\nwith $(touch canary-workdir) `x`'
    workdir.mkdir()
    env_value = "'\"\\$ `touch canary-env` $(touch canary-env2)\nsecond line"
    literal = "it'\\''s \"quoted\" $(touch canary-1) `touch canary-2` \\ %41 %% \t\x01"
    command = (
        f"echo '{literal}' > literal.out\n"
        ": $(touch ran-dollar) `touch ran-tick`\n"
        'printf %s "$V" > env.out\n'
        f"printf %s '{RAW}' > raw.out\n"
        "exit 4"
    )
    spec = LaunchSpec(
        run_id="h1",
        command=command,
        run_root=str(tmp_path / "runs"),
        workdir=str(workdir),
        env={"V": env_value},
    )
    executor = Executor(LocalTransport())
    pid = executor.launch(spec)
    assert pid is not None
    run_dir = tmp_path / "runs" / "h1"
    assert (run_dir / "command.sh").read_bytes() == os.fsencode(command)
    report = wait_exited(executor, RunRef("h1", str(tmp_path / "runs")))
    assert report.exit_code == 4
    assert (workdir / "env.out").read_text() == env_value
    assert (workdir / "literal.out").read_text() == literal.replace("'\\''", "'") + "\n"
    assert (workdir / "raw.out").read_bytes() == b"\xff\xfe latin-1 \xe9"
    assert {p.name for p in workdir.glob("ran-*")} == {"ran-dollar", "ran-tick"}, (
        "the command is the user's shell: its own $(...) runs, once, in its workdir"
    )
    assert not list(tmp_path.rglob("canary*")), "something was run that the user quoted"
    mode = (run_dir / "params").stat().st_mode
    assert mode & 0o077 == 0, "the params file is the run's only: 0600"
    assert executor.launch(spec) == pid, "a second launch answers the first one's pid"


def test_the_run_sees_labsites_own_variables_over_its_env(tmp_path):
    spec = LaunchSpec(
        run_id="v1",
        command="env > env.txt",
        run_root=str(tmp_path / "runs"),
        workdir=str(tmp_path),
        env={"LABSITE_RUN_ID": "forged", "CUDA_VISIBLE_DEVICES": "7", "PYTHONUNBUFFERED": "0"},
        env_setup="export FROM_SETUP=1",
        cuda_visible_devices=[2, 0],
    )
    executor = Executor(LocalTransport())
    executor.launch(spec)
    wait_exited(executor, RunRef("v1", str(tmp_path / "runs")))
    env = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines())
    assert env["LABSITE_RUN_ID"] == "v1"
    assert env["CUDA_VISIBLE_DEVICES"] == "2,0" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["LABSITE_RUN_DIR"] == str(tmp_path / "runs" / "v1")
    assert env["PYTHONUNBUFFERED"] == "0", "the run's own env may change Python's buffering"
    assert env["FROM_SETUP"] == "1", "env_setup runs in the wrapper's shell"
    assert "LABSITE_PARAMS" not in env


def wait_exited(executor: Executor, ref: RunRef) -> protocol.RunReport:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        report = executor.poll([ref])[0][ref.run_id]
        if report.state == "exited":
            return report
        time.sleep(0.05)
    raise AssertionError(f"{ref.run_id} did not end: {report}")


def test_poll_reads_a_run_root_that_is_not_plain_ascii(tmp_path):
    root = tmp_path / os.fsdecode(b"r\xffo\"ot' $(x)\nz")
    executor = Executor(LocalTransport())
    executor.launch(LaunchSpec(run_id="p1", command="echo hi; exit 3", run_root=str(root)))
    report = wait_exited(executor, RunRef("p1", str(root)))
    assert (report.exit_code, report.log_chunk) == (3, b"hi\n")


def launch_with(stdin: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["bash", "-c", launch_program()], input=stdin.encode(), capture_output=True, cwd=cwd
    )


def test_a_launch_cut_short_in_transfer_starts_nothing_and_a_retry_launches(tmp_path):
    spec = LaunchSpec(run_id="c1", command="exit 0", run_root=str(tmp_path))
    text = launch_input(spec)
    for cut in (text[: len(text) // 2], text[: len(text) - 200], text[:-9] + "\n"):
        done = launch_with(cut, tmp_path)
        with pytest.raises(ProtocolError, match="malformed"):
            protocol.parse_launch(done.stdout.decode())
    # Whole parameters, but a wrapper without its last line.
    params = protocol.launch_params(spec)
    params["wrapper_script"] = executors.source("wrapper.sh").encode()[:-40]
    done = launch_with(protocol.bash_params_line(params).split("=", 1)[1], tmp_path)
    with pytest.raises(ProtocolError, match="incomplete"):
        protocol.parse_launch(done.stdout.decode())
    assert not (tmp_path / "c1" / "pid").exists()
    assert isinstance(Executor(LocalTransport()).launch(spec), int)


def test_the_launchs_command_line_holds_nothing_of_the_run(tmp_path):
    """Its program is the same for every run (a host's process list shows it); the command,
    env and paths go on stdin, as base64 alone."""
    spec = LaunchSpec(
        run_id="zq81x",
        command="train --token sk-live-1234",
        run_root="/srv/secret-root",
        env={"WANDB_API_KEY": "wandb-secret-5678"},
    )
    program = launch_program()
    for secret in ("sk-live-1234", "wandb-secret-5678", "secret-root", "zq81x"):
        assert secret not in program
    assert re.fullmatch(r"[A-Za-z0-9+/=]+\n", launch_input(spec))
    assert b"wandb-secret-5678" in base64.b64decode(launch_input(spec))


def test_a_launch_after_a_cancel_starts_nothing(tmp_path):
    executor = Executor(LocalTransport())
    assert executor.cancel(run_id="k1", run_root=str(tmp_path), grace_seconds=0.1) == 0
    spec = LaunchSpec(run_id="k1", command="touch started", run_root=str(tmp_path))
    assert executor.launch(spec) is None
    assert not (tmp_path / "k1" / "pid").exists()


# Only the parameters' line depends on the parameters.

SCRIPT_PAIRS = [
    (
        bash_script("cancel.sh", protocol.cancel_params("~/runs", "a1", 1.0)),
        bash_script("cancel.sh", protocol.cancel_params("/x y", "b2", 30, "b2-a3")),
    ),
    (
        bash_script("watch.sh", protocol.watch_params("~/runs", 15)),
        bash_script("watch.sh", protocol.watch_params("/$(x)", 1)),
    ),
    (
        python_script("poll.py", protocol.poll_params([RunRef("a1", "~/runs")], gpu=True)),
        python_script("poll.py", protocol.poll_params([RunRef("b2", "/'\"", 5, 9, "b2-a2")])),
    ),
]


@pytest.mark.parametrize(("one", "other"), SCRIPT_PAIRS)
def test_scripts_differ_only_in_their_parameters_line(one, other):
    first, rest = one.split("\n", 1)
    other_first, other_rest = other.split("\n", 1)
    assert rest == other_rest
    assert first != other_first
    for line in (first, other_first):
        assert re.fullmatch(
            r'LABSITE_PARAMS=[A-Za-z0-9+/=]+|LABSITE_PARAMS = "[A-Za-z0-9+/=]+"', line
        )


def test_bad_names_never_reach_a_host():
    with pytest.raises(ValueError):
        protocol.launch_params(
            LaunchSpec(run_id="a1", command="x", run_root="/r", env={"A B": "1"})
        )
    with pytest.raises(ValueError):
        protocol.launch_params(LaunchSpec(run_id="../etc", command="x", run_root="/r"))
    with pytest.raises(ValueError):
        protocol.launch_params(LaunchSpec(run_id="a1", command="x", run_root="/r", env={"A": "\0"}))
    with pytest.raises(ValueError):
        protocol.bash_params_line({"Bad-Name": b""})


def test_watch_script_prints_the_lines_the_watcher_waits_for():
    text = executors.source("watch.sh")
    assert f"echo {protocol.WATCH_READY}\n" in text
    assert f"echo {protocol.WATCH_ALIVE} " in text


def test_a_wrapper_outlives_a_launcher_that_is_gone_before_it_says_its_pid(tmp_path):
    executor = Executor(LocalTransport())
    executor.launch(LaunchSpec(run_id="g1", command="exit 5", run_root=str(tmp_path)))
    ref = RunRef("g1", str(tmp_path))
    wait_exited(executor, ref)
    run_dir = tmp_path / "g1"
    for name in ("pid", "exit_code", "started_at"):
        (run_dir / name).unlink()
    # As if the connection was cut: fd 3 is a pipe nobody reads any more.
    read_end, write_end = os.pipe()
    os.close(read_end)
    subprocess.run(
        ["bash", "-c", f'exec bash "$0" 3>&{write_end} </dev/null', str(run_dir / "launch.sh")],
        pass_fds=(write_end,),
        check=False,
    )
    os.close(write_end)
    assert wait_exited(executor, ref).exit_code == 5
