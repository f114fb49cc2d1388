"""Runs on a Slurm cluster: submitted as jobs, and in line with what squeue says of them.

A run placed on a Slurm host is `launching` from its submission until Slurm runs its job (its
waiting reason is then Slurm's, in words), `running` while the job runs, and ends as the job's
terminal state says (clusters.slurm.ending): never on an unknown state, which is shown raw
while the run waits for Slurm to say more. The job's id, its name (labsite-<run id>) and the
run directory are the truth after any restart: a submission is looked up before it is made.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import redis
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from clusters import slurm, slurm_pacing
from clusters.executors import (
    LaunchSpec,
    ProtocolError,
    RunReport,
    SlurmExecutor,
    TransportError,
)
from clusters.models import Host
from experiments import jobs, services
from experiments.actors import Actor
from experiments.choices import RunReason, RunStatus
from experiments.models import Run, Sweep
from experiments.rundir import run_dir_name
from experiments.runner.ending import end_run, next_attempt
from labsite import buckets, locks

log = logging.getLogger(__name__)
SYSTEM = Actor.system()
# A placed run that Slurm does not show after this long lost its dispatch (as runner.sync).
RESUBMIT_AFTER = timedelta(seconds=10)


# A job whose node failed (NODE_FAIL, BOOT_FAIL) is submitted again without that node at most
# this many times, where the run allows retries.
MAX_NODE_FAIL_REQUEUES = 2


def sbatch_args(run: Run, host: Host) -> tuple[str, ...]:
    """The run's sbatch options: its own over its host's defaults. A run that allows no
    retries (`gpuwrap_config.retries` 0) is never requeued by Slurm either (--no-requeue)."""
    options = slurm.merged(host.slurm or {}, run.slurm or {})
    args = slurm.sbatch_args(
        options,
        gpus=run.gpus,
        cpus=run.cpus,
        memory_mb=run.memory_mb,
        facts=host.facts or {},
    )
    if _retries(run) == 0:
        args.append("--no-requeue")
    return tuple(args)


def _retries(run: Run) -> int:
    retries = (run.gpuwrap_config or {}).get("retries", -1)
    return retries if isinstance(retries, int) and not isinstance(retries, bool) else -1


def _requeue_without_node(run: Run, host: Host, message: str, nodes: str) -> bool:
    """A job whose node failed, of a run that allows retries: the run goes back to the queue
    as its next attempt (a job of its own, in a directory of its own), with that node added to
    its `exclude`. False where it may not (no retries, or they are spent)."""
    retries = _retries(run)
    limit = MAX_NODE_FAIL_REQUEUES if retries < 0 else min(retries, MAX_NODE_FAIL_REQUEUES)
    if not nodes or run.attempt > limit or run.stop_requested_at is not None:
        return False
    excluded = slurm.merged(host.slurm or {}, run.slurm or {}).get("exclude", "")
    options = {**(run.slurm or {}), "exclude": f"{excluded},{nodes}" if excluded else nodes}
    return services.run_transition(
        run_id=run.id,
        to=RunStatus.QUEUED,
        from_=[RunStatus.LAUNCHING, RunStatus.RUNNING],
        actor=SYSTEM,
        reason="slurm_node_fail_requeue",
        message=f"{message}; back to the queue without {nodes}, attempt {run.attempt + 1} of "
        f"{limit + 1}",
        fields={**next_attempt(run), "slurm_job_id": "", "slurm_state": "", "slurm": options},
        expect={"attempt": run.attempt},
    )


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def _paced(run: Run, host: Host, reserved: bool) -> bool:
    """Whether the submission may go now (LABSITE_SLURM_SUBMITS_PER_SECOND, _SUBMIT_BURST); if
    not, it is sent again for the slot the bucket reserved for it."""
    if reserved:
        return True
    lab = settings.LABSITE
    try:
        wait = buckets.take(
            _redis(),
            f"labsite:slurm:{host.pk}:submits",
            rate=float(lab["SLURM_SUBMITS_PER_SECOND"]),
            burst=int(lab["SLURM_SUBMIT_BURST"]),
        )
    except redis.RedisError as exc:
        log.warning("submit of %s: no rate bucket (%s); submitting", run.id, exc)
        return True
    if wait > 0:
        jobs.dispatch_in(run.id, wait, reserved=True)
        return False
    return True


def _orphan(run: Run, host: Host, executor: SlurmExecutor, job: str) -> None:
    """A job submitted for a run that left `launching` meanwhile (stopped while its submission
    was on its way): nothing will follow it, so it is cancelled now."""
    log.warning("run %s left launching while job %s was submitted: cancelling it", run.id, job)
    try:
        executor.cancel(
            run_id=run.id,
            run_root=host.run_root,
            dir_name=run_dir_name(run),
            grace_seconds=5.0,
            job_id=job,
        )
    except (TransportError, ProtocolError) as exc:
        log.error("cancel of run %s's job %s: %s", run.id, job, exc)
    slurm_pacing.record_calls(host.pk, executor.calls)


def submit(
    run: Run, host: Host, executor: SlurmExecutor, spec: LaunchSpec, *, reserved: bool = False
) -> None:
    """Submit a launching run's job, once, and record its id: one dispatch at a time per run (a
    Redis lock), and sbatch.sh looks the job up before it submits; paced per cluster."""
    if not _paced(run, host, reserved):
        return
    try:
        with locks.try_hold(_redis(), f"labsite:slurm:submit:{run.id}") as held:
            if held:
                _submit(run, host, executor, spec)
    except redis.RedisError as exc:
        log.warning("submit of %s: no lock (%s); the reconcile pass retries", run.id, exc)


def _submit(run: Run, host: Host, executor: SlurmExecutor, spec: LaunchSpec) -> None:
    try:
        job = executor.submit(spec)
    except TransportError as exc:
        slurm_pacing.record_calls(host.pk, executor.calls)
        log.warning("submit of %s: %s (the reconcile pass retries)", run.id, exc)
        return
    except (ProtocolError, ValueError) as exc:
        _refused([run], exc)
        return
    slurm_pacing.record_calls(host.pk, executor.calls)
    slurm_pacing.reset(host.pk)  # its PENDING reason, and its start, come sooner
    if job is None:
        services.run_transition(
            run_id=run.id,
            to=RunStatus.STOPPED,
            from_=[RunStatus.LAUNCHING],
            actor=SYSTEM,
            reason=RunReason.USER_STOP,
            message="cancelled before it was submitted",
        )
        return
    mine = Run.objects.filter(
        pk=run.id, status__in=[RunStatus.LAUNCHING, RunStatus.RUNNING], attempt=run.attempt
    )
    if mine.filter(~Q(slurm_job_id=job)).update(slurm_job_id=job):
        run.slurm_job_id = job
        services.run_event(run, actor=SYSTEM, reason="slurm_submitted", message=f"job {job}")
    elif not mine.exists():
        _orphan(run, host, executor, job)
        return
    log.info("submit of %s: job %s on %s", run.id, job, host.name)


def _refused(runs: list[Run], exc: Exception) -> None:
    """Slurm refused the submission for good: the runs fail with its words (launch_error)."""
    moved = services.runs_transition(
        run_ids=[r.id for r in runs],
        to=RunStatus.FAILED,
        from_=[RunStatus.LAUNCHING],
        actor=SYSTEM,
        reason=RunReason.LAUNCH_ERROR,
        message=str(exc),
        fields={"error": str(exc)[:2000]},
    )
    if moved:
        jobs.kick_scheduler()


def array_throttle(run: Run) -> int | None:
    """The job array throttle of the run's sweep, when its runs go to Slurm as one array."""
    if not run.sweep_id:
        return None
    return (
        Sweep.objects.filter(pk=run.sweep_id).values_list("slurm_array_throttle", flat=True).first()
    )


def submit_array(
    run: Run,
    host: Host,
    executor: SlurmExecutor,
    throttle: int,
    spec_of: Callable[[Run, Host], LaunchSpec],
) -> None:
    """Submit the run with every other run of its sweep placed on this cluster and not yet
    submitted, as one job array (`--array=0-N%throttle`), and record each element's id. One
    dispatch at a time per sweep does it (a Redis lock); the others find their id recorded."""
    try:
        with locks.try_hold(_redis(), f"labsite:slurm:array:{run.sweep_id}") as held:
            if not held:
                jobs.dispatch_in(run.id, 1.0)  # the holder is submitting: look again then
                return
            _submit_array(run, host, executor, throttle, spec_of)
    except redis.RedisError as exc:
        log.warning("array submit of %s: no lock (%s); the reconcile pass retries", run.id, exc)


def _submit_array(
    run: Run,
    host: Host,
    executor: SlurmExecutor,
    throttle: int,
    spec_of: Callable[[Run, Host], LaunchSpec],
) -> None:
    # Read before the runs: a sibling placed in between is then among them.
    placing = Run.objects.filter(sweep_id=run.sweep_id, host=host, status=RunStatus.QUEUED).exists()
    runs = list(
        Run.objects.filter(
            sweep_id=run.sweep_id,
            host=host,
            status=RunStatus.LAUNCHING,
            slurm_job_id="",
            stop_requested_at__isnull=True,
        )
        .select_related("host")
        .order_by("id")
    )
    if not runs:
        return  # submitted by another dispatch, or stopped
    first = min((r.launched_at for r in runs if r.launched_at), default=None)
    gather = timedelta(seconds=float(settings.LABSITE["SCHEDULE_INTERVAL_SECONDS"]) + 1)
    if placing and first is not None and timezone.now() - first < gather:
        # The pass is still placing the sweep's runs (each placement commits, and sends its
        # dispatch, on its own): wait for them, so that the sweep is one array under one
        # throttle, not several arrays each allowed that many.
        jobs.dispatch_in(run.id, 0.3)
        return
    # One array takes one set of sbatch options: the runs that ask what this one asks (a
    # run added to the sweep with options of its own goes in an array of its own).
    words = sbatch_args(run, host)
    runs = [r for r in runs if sbatch_args(r, host) == words]
    if not runs:
        return
    specs = [replace(spec_of(r, host), sbatch_args=words) for r in runs]
    digest = hashlib.sha256(",".join(r.id for r in runs).encode()).hexdigest()[:16]
    root = host.run_root.rstrip("/")
    try:
        job_ids = executor.submit_array(
            specs,
            job_name=f"labsite-array-{digest}",
            throttle=throttle,
            list_path=f"{root}/.arrays/{digest}.list",
        )
    except TransportError as exc:
        slurm_pacing.record_calls(host.pk, executor.calls)
        log.warning("array submit of sweep %s: %s (retried)", run.sweep_id, exc)
        return
    except (ProtocolError, ValueError) as exc:
        _refused(runs, exc)
        return
    slurm_pacing.record_calls(host.pk, executor.calls)
    slurm_pacing.reset(host.pk)
    for r, job in zip(runs, job_ids, strict=True):
        if not job:
            continue  # stopped while the array was on its way: left out of it
        updated = Run.objects.filter(
            pk=r.id, status=RunStatus.LAUNCHING, attempt=r.attempt, slurm_job_id=""
        ).update(slurm_job_id=job)
        if updated:
            services.run_event(
                r, actor=SYSTEM, reason="slurm_submitted", message=f"job {job} (array)"
            )
        elif not Run.objects.filter(pk=r.id, slurm_job_id=job).exists():
            _orphan(r, host, executor, job)
    log.info("array submit of sweep %s: %d run(s) on %s", run.sweep_id, len(runs), host.name)


def apply(run: Run, report: RunReport, *, complete: bool, cancelled: bool) -> bool | None:
    """Bring a Slurm run in line with squeue (and its run directory); True when it ended.
    None: nothing Slurm-specific applies (squeue did not answer): the caller does nothing."""
    if not report.slurm_polled:
        return None
    job = report.slurm
    if job is None:
        return _left_the_queue(run, report, complete=complete, cancelled=cancelled)
    _note_state(run, job.state, job.reason, job.partition, job.job_id)
    live = job.state in slurm.WAITING_STATES or job.state in slurm.RUNNING_STATES
    if live and run.stop_requested_at is not None and not cancelled:
        # Stopped while its submission was on its way: cancel it now that Slurm shows it.
        jobs.cancel_later(run.id)
        return False
    if job.state in slurm.WAITING_STATES:
        if run.status == RunStatus.RUNNING:
            # Requeued (preempted, or its node failed): it waits in Slurm again.
            services.run_transition(
                run_id=run.id,
                to=RunStatus.LAUNCHING,
                from_=[RunStatus.RUNNING],
                actor=SYSTEM,
                reason="slurm_requeued",
                message=f"Slurm: job {job.job_id} {job.state} ({job.reason})",
                fields={"waiting_reason": slurm.pending_words(job.reason, job.partition)},
                expect={"attempt": run.attempt},
            )
        return False
    if job.state in slurm.RUNNING_STATES:
        if run.status == RunStatus.LAUNCHING:
            services.run_transition(
                run_id=run.id,
                to=RunStatus.RUNNING,
                from_=[RunStatus.LAUNCHING],
                actor=SYSTEM,
                message=f"Slurm: job {job.job_id} {job.state} on {job.nodes or '?'}",
                fields={"pid": report.pid, "waiting_reason": ""},
                expect={"attempt": run.attempt},
            )
        return False
    code = report.exit_code if report.exit_code is not None else job.exit_code
    ended = slurm.ending(
        job.state, exit_code=code, nodes=job.nodes, by=job.by, notes=report.slurm_notes
    )
    if ended is None:
        return False  # unknown: shown raw (slurm_state), never taken as an end
    if not complete:
        return False  # copy the whole log first
    if ended.reason == RunReason.NODE_FAIL and run.host is not None:
        if _requeue_without_node(run, run.host, ended.message, job.nodes):
            return True  # its next attempt is placed (and submitted) by the pass this asks
    elapsed = slurm.parse_elapsed(job.elapsed)
    fields = {"slurm_elapsed_seconds": elapsed} if elapsed is not None else {}
    if run.stop_requested_at is not None:
        # Asked to stop, and Slurm says the job is over (cancelled, or it ended first).
        return end_run(
            run,
            RunStatus.STOPPED,
            RunReason.USER_STOP,
            ended.message,
            code,
            started_at=report.started_at,
            fields=fields,
        )
    return end_run(
        run,
        ended.status,
        ended.reason,
        ended.message,
        code,
        started_at=report.started_at,
        fields=fields,
    )


def _left_the_queue(run: Run, report: RunReport, *, complete: bool, cancelled: bool) -> bool:
    """No job in squeue: not submitted yet (a dispatch on its way), or gone past Slurm's
    MinJobAge, when the run directory's exit_code is what is left to go by."""
    if not run.slurm_job_id:
        if run.status == RunStatus.LAUNCHING and run.stop_requested_at is not None:
            jobs.cancel_later(run.id)
        elif run.launched_at is None or timezone.now() - run.launched_at > RESUBMIT_AFTER:
            jobs.dispatch_later(run.id)  # the dispatch was lost: submit (once) again
        return False
    if report.state != "exited":
        if not complete:
            return False
        message = f"Slurm no longer knows job {run.slurm_job_id}, and it left no exit code"
        memory = slurm.memory_note(report.slurm_notes)
        if run.stop_requested_at is not None:
            to, why = RunStatus.STOPPED, RunReason.USER_STOP
        elif memory:
            # Killed over its memory, wrapper and all: slurmstepd said so in its output.
            to, why, message = RunStatus.FAILED, RunReason.OOM, f"Slurm: over its memory: {memory}"
        else:
            to, why = RunStatus.FAILED, RunReason.LOST
        return end_run(run, to, why, message, None)
    if not complete:
        return False
    code, began = report.exit_code, report.started_at
    if run.stop_requested_at is not None:
        return end_run(
            run,
            RunStatus.STOPPED,
            RunReason.USER_STOP,
            f"stopped (exit {code})",
            code,
            started_at=began,
        )
    if code == 0:
        return end_run(run, RunStatus.FINISHED, "", "exit code 0", code, started_at=began)
    return end_run(
        run, RunStatus.FAILED, RunReason.EXIT_CODE, f"exit code {code}", code, started_at=began
    )


def _note_state(run: Run, state: str, reason: str, partition: str, job_id: str) -> None:
    """Slurm's raw state (and a pending job's reason, in words) on the run: bookkeeping that
    each poll rewrites, like a queued run's waiting reason (models.Run), written only when it
    changed."""
    waiting = slurm.pending_words(reason, partition) if state in slurm.WAITING_STATES else ""
    changes = {}
    if run.slurm_state != state:
        changes["slurm_state"] = state
    if run.status == RunStatus.LAUNCHING and run.waiting_reason != waiting:
        changes["waiting_reason"] = waiting
    if not run.slurm_job_id and job_id:
        changes["slurm_job_id"] = job_id  # submitted before a restart could record it
    if changes:
        Run.objects.filter(pk=run.id, attempt=run.attempt).update(**changes)
