"""Slurm as Labsite speaks it (clusters.slurm), and what a run on a Slurm host becomes, on rows:
the options a run may ask, the 400s that name what is valid, placement, and every job state.
Against a real slurmctld: tests/slurm."""

from __future__ import annotations

import pytest
from django.utils import timezone

from clusters import slurm
from clusters.executors import RunReport, SlurmJob
from clusters.models import Host
from experiments import scheduler, services
from experiments.actors import Actor
from experiments.models import GpuLease, Run, RunEvent
from experiments.runner import slurm as runner_slurm

FACTS = {
    "partitions": [
        {
            "name": "gpu",
            "default": True,
            "nodes": 2,
            "gpus": 8,
            "max_gpus_per_node": 4,
            "max_time_minutes": None,
            "states": {"idle": 2},
        },
        {
            "name": "short",
            "default": False,
            "nodes": 1,
            "gpus": 4,
            "max_gpus_per_node": 4,
            "max_time_minutes": 10,
            "states": {"idle": 1},
        },
    ],
    "nodes": 2,
    "gpus": 8,
    "version": "22.05.8",
    "slurm_conf": "",
}


@pytest.fixture
def cluster(db):
    return Host.objects.create(
        name="slurm",
        kind="slurm",
        hostname="localhost",
        state="online",
        gpu_source="slurm",
        facts=FACTS,
        slurm={"account": "lab", "cpus_per_gpu": 4},
    )


def post(person, **body):
    return person.client.post(
        "/api/runs", {"command": "train", "auto_start": True, **body}, format="json"
    )


def test_times_in_every_slurm_form():
    assert slurm.parse_time("30") == 30
    assert slurm.parse_time("30:01") == 31  # seconds round up
    assert slurm.parse_time("2:00:00") == 120
    assert slurm.parse_time("1-00") == 1440
    assert slurm.parse_time("1-02:30") == 1590
    assert slurm.parse_time("2-00:00:00") == 2880
    assert slurm.parse_time("UNLIMITED") is None and slurm.parse_time("infinite") is None
    for bad in ("", "abc", "1:2:3:4", "0", "-5", "1-x"):
        with pytest.raises(ValueError):
            slurm.parse_time(bad)
    assert slurm.format_minutes(1590) == "1-02:30:00"


def test_options_are_known_keys_and_plain_words():
    assert slurm.check_options({"partition": "gpu", "cpus_per_task": 8}) == {
        "partition": "gpu",
        "cpus_per_task": 8,
    }
    for bad, words in [
        ({"partiton": "gpu"}, "unknown key(s) partiton; allowed: partition"),
        ({"partition": "gpu; rm -rf ~"}, "plain word"),
        ({"account": "--wrap=x"}, "plain word"),
        ({"time": "UNLIMITED"}, "never UNLIMITED"),
        ({"mem": "lots"}, "size such as 16G"),
        ({"cpus_per_task": "8"}, "whole number"),
        ({"cpus_per_gpu": 2, "cpus_per_task": 8}, "not both"),
        ("gpu", "must be an object"),
    ]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            slurm.check_options(bad)


def test_sbatch_words_for_a_run():
    options = slurm.merged(
        {"account": "lab", "cpus_per_gpu": 4, "mem": "8G"},
        {"partition": "short", "cpus_per_task": 2, "time": "5"},
    )
    assert slurm.sbatch_args(options, gpus=2, cpus=1, memory_mb=None, facts=FACTS) == [
        "--partition=short",
        "--account=lab",
        "--time=0-00:05:00",
        "--gres=gpu:2",
        "--cpus-per-task=2",
        "--mem=8G",
    ]
    # No time asked: the partition's MaxTime when it has one, else a day; never UNLIMITED.
    assert "--time=0-00:10:00" in slurm.sbatch_args(
        {"partition": "short"}, gpus=0, cpus=3, memory_mb=500, facts=FACTS
    )
    plain = slurm.sbatch_args({}, gpus=0, cpus=3, memory_mb=500, facts=FACTS)
    assert plain == ["--time=1-00:00:00", "--cpus-per-task=3", "--mem=500M"]


def test_what_a_cluster_could_never_run_is_named_with_what_is_valid():
    assert slurm.check_against({}, gpus=4, facts=FACTS) is None
    assert slurm.check_against({"partition": "nope"}, gpus=1, facts=FACTS) == (
        "unknown partition 'nope'; this cluster has: gpu, short"
    )
    assert "largest node of partition gpu has 4" in slurm.check_against({}, gpus=5, facts=FACTS)
    assert "above partition short's MaxTime (0-00:10:00)" in slurm.check_against(
        {"partition": "short", "time": "20"}, gpus=0, facts=FACTS
    )
    assert slurm.check_against({"time": "9-00"}, gpus=0, facts=FACTS) is None  # INFINITE


def test_every_terminal_state_and_none_taken_for_success():
    cases = {
        "COMPLETED": ("finished", ""),
        "FAILED": ("failed", "exit_code"),
        "CANCELLED": ("stopped", "cancelled"),
        "TIMEOUT": ("failed", "timeout"),
        "OUT_OF_MEMORY": ("failed", "oom"),
        "NODE_FAIL": ("failed", "node_fail"),
        "BOOT_FAIL": ("failed", "node_fail"),
        "DEADLINE": ("failed", "deadline"),
        "PREEMPTED": ("failed", "preempted"),
        "SPECIAL_EXIT": ("failed", "exit_code"),
    }
    for state, (status, reason) in cases.items():
        end = slurm.ending(state, exit_code=0 if state == "COMPLETED" else 1, nodes="n7")
        assert end is not None and (end.status, end.reason) == (status, reason), state
    assert "n7" in slurm.ending("NODE_FAIL", exit_code=None, nodes="n7").message
    assert slurm.ending("COMPLETED", exit_code=2).status == "failed"
    for state in ("PENDING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "WEIRD_NEW"):
        assert slurm.ending(state, exit_code=0) is None, state


def test_pending_reasons_in_words():
    assert slurm.pending_words("Resources", "gpu") == "Slurm: waiting for resources (partition gpu)"
    assert slurm.pending_words("Priority") == "Slurm: waiting behind jobs of higher priority"
    assert slurm.pending_words("QOSMaxGRESPerUser", "gpu").startswith("Slurm: a QOS limit")
    assert slurm.pending_words("SomethingNew") == "Slurm: SomethingNew"
    assert "not looked at it yet" in slurm.pending_words("None")
    assert slurm.pending_words("ReqNodeNotAvail, UnavailableNodes:n3", "gpu") == (
        "Slurm: a node it asks is not available (UnavailableNodes:n3) (partition gpu)"
    )


def test_a_run_on_a_slurm_host_takes_its_options_and_bad_ones_are_a_400(cluster, member):
    created = post(member, host="slurm", gpus=2, slurm={"partition": "short", "time": "5"})
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["slurm"] == {"partition": "short", "time": "5"} and body["slurm_state"] == ""
    assert body["waiting_reason"] == "waiting for the scheduler's next pass"
    before = Run.objects.count()
    for extra, words in [
        ({"gpus": 1, "slurm": {"partition": "nope"}}, "this cluster has: gpu, short"),
        ({"gpus": 5}, "largest node of partition gpu has 4"),
        ({"slurm": {"partition": "short", "time": "20"}}, "MaxTime"),
        ({"slurm": {"qos": "high", "nodes": 2}}, "unknown key(s) nodes"),
        ({"slurm": {"time": "UNLIMITED"}}, "never UNLIMITED"),
    ]:
        refused = post(member, host="slurm", **extra)
        assert refused.status_code == 400, (extra, refused.content)
        assert words in refused.content.decode(), (extra, refused.content)
    refused = post(member, slurm={"partition": "gpu"})
    assert refused.status_code == 400 and b"Slurm host" in refused.content
    assert Run.objects.count() == before, "a refused run leaves nothing behind"


def test_a_run_pinned_to_slurm_goes_to_it_at_once_whatever_the_labs_gpus(cluster, member):
    actor = Actor(kind="user", user=member.user)
    runs = [
        services.run_create(
            actor=actor, command="train", gpus=4, host=cluster, auto_start=True, kick=False
        )
        for _ in range(3)
    ]
    cpu_run = services.run_create(
        actor=actor, command="prep", host=cluster, auto_start=True, kick=False
    )
    unpinned = services.run_create(actor=actor, command="x", gpus=1, auto_start=True, kick=False)
    scheduler.schedule_pass(full=False)
    for run in [*runs, cpu_run]:
        run.refresh_from_db()
        assert run.status == "launching" and run.host_id == cluster.pk, run
        assert not GpuLease.objects.filter(run=run).exists(), "Slurm pins its GPUs itself"
    unpinned.refresh_from_db()
    assert unpinned.status == "queued", "an unpinned run is never sent to Slurm on its own"


def report(
    job: SlurmJob | None, *, state: str = "starting", code: int | None = None, polled: bool = True
) -> RunReport:
    return RunReport(state=state, exit_code=code, slurm=job, slurm_polled=polled)


@pytest.fixture
def placed(cluster, member):
    run = services.run_create(
        actor=Actor(kind="user", user=member.user),
        command="train",
        gpus=1,
        host=cluster,
        auto_start=True,
        kick=False,
    )
    scheduler.schedule_pass(full=False)
    Run.objects.filter(pk=run.pk).update(slurm_job_id="41")
    return Run.objects.get(pk=run.pk)


def test_slurms_states_move_the_run(placed):
    run = placed
    pending = SlurmJob("41", "PENDING", "gpu", "", "Resources")
    assert runner_slurm.apply(run, report(pending), complete=True, cancelled=False) is False
    run.refresh_from_db()
    assert (run.status, run.slurm_state) == ("launching", "PENDING")
    assert run.waiting_reason == "Slurm: waiting for resources (partition gpu)"
    running = SlurmJob("41", "RUNNING", "gpu", "n3", "None")
    runner_slurm.apply(run, report(running, state="running"), complete=True, cancelled=False)
    run.refresh_from_db()
    assert (run.status, run.slurm_state, run.waiting_reason) == ("running", "RUNNING", "")
    # A state Slurm may add one day: shown raw, and the run stays as it is.
    odd = SlurmJob("41", "SOMETHING_NEW", "gpu", "n3", "None")
    assert (
        runner_slurm.apply(run, report(odd, state="exited", code=0), complete=True, cancelled=False)
        is False
    )
    run.refresh_from_db()
    assert (run.status, run.slurm_state) == ("running", "SOMETHING_NEW")
    # squeue did not answer: nothing moves.
    assert (
        runner_slurm.apply(run, report(None, polled=False), complete=True, cancelled=False) is None
    )
    timeout = SlurmJob("41", "TIMEOUT", "gpu", "n3", "TimeLimit")
    assert (
        runner_slurm.apply(
            run, report(timeout, state="exited", code=143), complete=True, cancelled=False
        )
        is True
    )
    run.refresh_from_db()
    assert (run.status, run.reason, run.exit_code) == ("failed", "timeout", 143)
    assert "time limit on n3" in run.error
    assert RunEvent.objects.filter(run=run, to_status="failed", reason="timeout").exists()


def test_a_job_gone_from_squeue_ends_by_its_exit_code_or_as_lost(placed, member):
    run = placed
    Run.objects.filter(pk=run.pk).update(status="running", started_at=timezone.now())
    run.refresh_from_db()
    assert runner_slurm.apply(
        run, report(None, state="exited", code=0), complete=True, cancelled=False
    )
    run.refresh_from_db()
    assert run.status == "finished"
    other = services.run_create(
        actor=Actor(kind="user", user=member.user),
        command="t",
        host=run.host,
        auto_start=True,
        kick=False,
    )
    scheduler.schedule_pass(full=False)
    Run.objects.filter(pk=other.pk).update(slurm_job_id="42", status="running")
    other.refresh_from_db()
    assert runner_slurm.apply(other, report(None, state="starting"), complete=True, cancelled=False)
    other.refresh_from_db()
    assert (other.status, other.reason) == ("failed", "lost")


def test_a_requeued_job_waits_again_and_a_stop_on_its_way_is_sent_again(placed, monkeypatch):
    from experiments import jobs

    run = placed
    running = SlurmJob("41", "RUNNING", "gpu", "n3", "None")
    runner_slurm.apply(run, report(running, state="running"), complete=True, cancelled=False)
    run.refresh_from_db()
    assert run.status == "running"
    requeued = SlurmJob("41", "PENDING", "gpu", "", "BeginTime")
    runner_slurm.apply(run, report(requeued), complete=True, cancelled=False)
    run.refresh_from_db()
    assert run.status == "launching"
    assert run.waiting_reason == "Slurm: waiting for its begin time (partition gpu)"
    assert RunEvent.objects.filter(run=run, reason="slurm_requeued", to_status="launching")
    # Stopped while Slurm still runs it (the submission raced the cancel): cancelled again.
    sent: list[str] = []
    monkeypatch.setattr(jobs, "cancel_later", sent.append)
    Run.objects.filter(pk=run.pk).update(stop_requested_at=timezone.now())
    run.refresh_from_db()
    assert runner_slurm.apply(run, report(running), complete=True, cancelled=False) is False
    assert sent == [run.id]


def test_a_job_no_poll_saw_running_still_counts_its_gpu_hours(placed):
    from datetime import timedelta

    Run.objects.filter(pk=placed.pk).update(launched_at=timezone.now() - timedelta(hours=2))
    run = Run.objects.get(pk=placed.pk)
    began = timezone.now().timestamp() - 3600
    done = SlurmJob("41", "COMPLETED", "gpu", "n3", "None")
    rep = RunReport(state="exited", exit_code=0, started_at=began, slurm=done, slurm_polled=True)
    assert runner_slurm.apply(run, rep, complete=True, cancelled=False) is True
    run.refresh_from_db()
    assert run.status == "finished" and run.started_at is not None
    assert abs(run.started_at.timestamp() - began) < 1
    assert (run.ended_at - run.started_at).total_seconds() >= 3599


def test_an_admin_sets_a_slurm_hosts_defaults_and_bad_ones_are_refused(cluster, admin, member):
    url = "/api/hosts/slurm"
    ok = admin.client.patch(url, {"slurm": {"partition": "short", "qos": "normal"}}, format="json")
    assert ok.status_code == 200, ok.content
    assert ok.json()["slurm"] == {"partition": "short", "qos": "normal"}
    bad = admin.client.patch(url, {"slurm": {"partition": "a b"}}, format="json")
    assert bad.status_code == 400 and b"plain word" in bad.content
    assert member.client.patch(url, {"slurm": {}}, format="json").status_code == 403
    cluster.refresh_from_db()
    assert cluster.slurm == {"partition": "short", "qos": "normal"}
    # The defaults are checked with each run: time above the default partition's MaxTime.
    refused = post(member, host="slurm", slurm={"time": "30"})
    assert refused.status_code == 400 and b"MaxTime" in refused.content


def test_a_start_stamp_a_command_could_forge_is_taken_only_when_plausible(placed):
    done = SlurmJob("41", "COMPLETED", "gpu", "n3", "None")
    for forged in (float("nan"), float("inf"), 1e20, -5.0):
        run = Run.objects.get(pk=placed.pk)
        rep = RunReport(
            state="exited", exit_code=0, started_at=forged, slurm=done, slurm_polled=True
        )
        assert runner_slurm.apply(run, rep, complete=True, cancelled=False) is True
        run.refresh_from_db()
        assert run.status == "finished" and run.started_at is None, forged
        Run.objects.filter(pk=run.pk).update(status="launching", ended_at=None)


def test_a_run_asked_to_stop_whose_job_ended_first_is_stopped(placed):
    Run.objects.filter(pk=placed.pk).update(stop_requested_at=timezone.now())
    run = Run.objects.get(pk=placed.pk)
    done = SlurmJob("41", "COMPLETED", "gpu", "n3", "None")
    rep = RunReport(state="exited", exit_code=0, slurm=done, slurm_polled=True)
    assert runner_slurm.apply(run, rep, complete=True, cancelled=False) is True
    run.refresh_from_db()
    assert (run.status, run.reason, run.exit_code) == ("stopped", "user_stop", 0)


def test_a_slurm_host_needs_its_login_node(admin):
    response = admin.client.post("/api/hosts", {"name": "c2", "kind": "slurm"}, format="json")
    assert response.status_code == 400, response.content
    assert "login node" in response.json()["detail"], response.content
    assert not Host.objects.filter(name="c2").exists()


def test_a_login_nodes_detect_answer_becomes_the_hosts_facts():
    from clusters.executors import ProtocolError, protocol

    seen = protocol.parse_detect(
        "LABSITE_VERSION slurm-wlm 22.05.8\nLABSITE_ACCOUNTING 0\n"
        "LABSITE_SINFO n1|gpu*|gpu:a100:4|mixed|infinite\n"
        "LABSITE_SINFO n2|gpu*|gpu:2|drained*|infinite\nLABSITE_CALLS 3\n"
    )
    facts = slurm.detection_facts(seen.sinfo, seen.version, accounting=seen.accounting)
    assert facts["version"] == "22.05.8" and facts["accounting"] is False
    assert facts["gpus"] == 6 and facts["node_states"] == {"mixed": 1, "drained": 1}
    with pytest.raises(ProtocolError, match="sinfo: slurm_load_partitions"):
        protocol.parse_detect("LABSITE_ERROR sinfo: slurm_load_partitions: Unable to contact")
    with pytest.raises(ProtocolError, match="unexpected detect answer"):
        protocol.parse_detect("LABSITE_SINFO n1|gpu*|gpu:4|idle|infinite\n")


def test_slurmstepds_memory_words_make_a_failed_job_an_oom():
    cgroup = (
        "slurmstepd: error: Detected 1 oom-kill event(s) in StepId=7.batch. Some of your "
        "processes may have been killed by the cgroup out-of-memory handler."
    )
    overkill = "slurmstepd-n1: error: Exceeded job memory limit"
    for state in ("FAILED", "CANCELLED", "OUT_OF_MEMORY"):
        end = slurm.ending(state, exit_code=137, nodes="n1", notes=cgroup)
        assert end is not None and (end.status, end.reason) == ("failed", "oom"), state
    end = slurm.ending("FAILED", exit_code=0, notes=overkill)
    assert (
        end is not None
        and end.reason == "oom"
        and end.message.endswith(": Exceeded job memory limit")
    ), end
    # A job that succeeded is finished, whatever its output says; no words, no oom.
    assert slurm.ending("COMPLETED", exit_code=0, notes=cgroup).reason == ""
    assert (
        slurm.ending("FAILED", exit_code=1, notes="slurmstepd: error: *** JOB 7 CANCELLED").reason
        == "exit_code"
    )
    assert slurm.memory_note("") == ""


def test_elapsed_times_as_squeue_and_sacct_write_them():
    cases = {
        "0:00": 0,
        "5:03": 303,
        "1:02:03": 3723,
        "00:00:07": 7,
        "2-01:02:03": 2 * 86400 + 3723,
        "INVALID": None,
        "": None,
        "1-5:03": None,
        "x:01": None,
    }
    assert {text: slurm.parse_elapsed(text) for text in cases} == cases


def test_a_slurm_runs_gpu_hours_are_its_jobs_elapsed_time_times_its_gpus(placed, member):
    """Polls see a job start and end late (every 5 to 60 s): the plan's budget counts the job's
    own run time, as Slurm says it, times its GPUs."""
    from datetime import timedelta

    from experiments.models import Plan

    plan = Plan.objects.create(title="p", author=member.user, raw_markdown="# p")
    Run.objects.filter(pk=placed.pk).update(
        plan=plan, gpus=2, status="running", started_at=timezone.now() - timedelta(hours=3)
    )
    run = Run.objects.get(pk=placed.pk)
    done = SlurmJob("41", "COMPLETED", "gpu", "n3", "None", elapsed="1:30:00")
    rep = RunReport(state="exited", exit_code=0, slurm=done, slurm_polled=True)
    assert runner_slurm.apply(run, rep, complete=True, cancelled=False) is True
    run.refresh_from_db()
    assert (run.status, run.slurm_elapsed_seconds) == ("finished", 5400)
    assert scheduler.plan_gpu_hours([plan.id]) == {plan.id: 3.0}, "1.5 h x 2 GPUs, not 3 h x 2"


def test_gpus_asked_by_gres_or_gpus_with_or_without_a_type():
    words = {
        (None, None): "--gres=gpu:2",
        ("a100", None): "--gres=gpu:a100:2",
        (None, "gpus"): "--gpus=2",
        ("a100", "gpus"): "--gpus=a100:2",
        ("a100", "gres"): "--gres=gpu:a100:2",
    }
    for (kind, option), word in words.items():
        options = {k: v for k, v in (("gpu_type", kind), ("gpu_option", option)) if v}
        assert slurm.check_options(options) == options
        args = slurm.sbatch_args(options, gpus=2, cpus=1, memory_mb=None, facts=FACTS)
        assert word in args and sum(a.startswith(("--gres", "--gpus")) for a in args) == 1
    assert not any(
        a.startswith(("--gres", "--gpus"))
        for a in slurm.sbatch_args({"gpu_option": "gpus"}, gpus=0, cpus=1, memory_mb=None, facts={})
    )
    with pytest.raises(ValueError, match="gpu_option must be one of: gres, gpus"):
        slurm.check_options({"gpu_option": "tres"})
    with pytest.raises(ValueError, match="gpu_type must be a GRES type"):
        slurm.check_options({"gpu_type": "a100:4"})
    # The types each partition has, as sinfo showed them: a type it lacks is named before
    # anything is submitted.
    facts = slurm.parse_sinfo(
        "n1|gpu*|gpu:a100:4,gpu:v100:2|idle|infinite\nn2|cpu|(null)|idle|1:00:00\n"
    )
    assert facts["partitions"][0]["gpu_types"] == ["a100", "v100"]
    assert facts["partitions"][0]["max_gpus_per_node"] == 6
    assert slurm.check_against({"gpu_type": "a100"}, gpus=2, facts=facts) is None
    assert slurm.check_against({"gpu_type": "h100"}, gpus=2, facts=facts) == (
        "partition gpu has no GPUs of type 'h100'; its types: a100, v100"
    )


def test_the_reconcile_pass_keeps_a_clusters_pace(placed, monkeypatch):
    """Every host with active runs is asked again by the reconcile pass, but a Slurm cluster
    only once its poll is due: its squeues count against the user's RPC limit."""
    from clusters import slurm_pacing
    from experiments import jobs
    from experiments.runner.reconcile import reconcile

    asked: list[int] = []
    monkeypatch.setattr(jobs, "poll_soon", asked.append)
    slurm_pacing.reset(placed.host_id)
    slurm_pacing.polled(placed.host_id, changed=True)  # just polled: the next in 5 s
    assert reconcile().get("hosts", 0) == 0 and asked == []
    monkeypatch.setattr(slurm_pacing, "poll_due", lambda host_id: True)
    reconcile()
    assert asked == [placed.host_id]
