"""The lab's work: plans, sweeps, runs, their audit trail, GPU leases and alerts."""

from __future__ import annotations

import secrets

from django.conf import settings
from django.db import models
from django.db.models import Q

from experiments.choices import (
    ActorKind,
    AlertSeverity,
    AlertStatus,
    PlanStatus,
    RunStatus,
    SweepKind,
)


def new_id() -> str:
    return secrets.token_hex(6)


class Plan(models.Model):
    """A research plan that a PI reviews; work linked to it waits for approval."""

    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    title = models.CharField(max_length=300)
    goal = models.TextField(blank=True)
    raw_markdown = models.TextField(blank=True)
    sections = models.JSONField(default=dict, blank=True)
    session_id = models.CharField(max_length=200, blank=True, db_index=True)
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="plans"
    )
    status = models.CharField(max_length=20, choices=PlanStatus.choices, default=PlanStatus.DRAFT)
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="reviewed_plans",
    )
    review_comment = models.TextField(blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    gpu_hours_budget = models.FloatField(null=True, blank=True)
    # Approved by its own author (a PI): allowed unless LABSITE_PI_SELF_APPROVAL is off, and
    # shown, since nobody else reviewed it.
    self_approved = models.BooleanField(default=False)
    submitted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.title} ({self.status})"


class PlanEvent(models.Model):
    """One decision on a plan: who moved it from what to what, and why."""

    plan = models.ForeignKey(Plan, on_delete=models.CASCADE, related_name="events")
    from_status = models.CharField(max_length=20, blank=True)
    to_status = models.CharField(max_length=20)
    comment = models.TextField(blank=True)
    actor_kind = models.CharField(max_length=8, choices=ActorKind.choices)
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.plan_id}: {self.from_status or '-'} -> {self.to_status}"


class Sweep(models.Model):
    """A group of runs: a parameter grid expanded at once, or a wild sweep an agent fills."""

    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    name = models.CharField(max_length=200)
    goal = models.TextField(blank=True)
    plan = models.ForeignKey(
        Plan, on_delete=models.SET_NULL, null=True, blank=True, related_name="sweeps"
    )
    kind = models.CharField(max_length=8, choices=SweepKind.choices, default=SweepKind.GRID)
    base_command = models.TextField(blank=True)
    parameters = models.JSONField(default=dict, blank=True)
    max_runs = models.PositiveIntegerField(null=True, blank=True)
    chat_session_id = models.CharField(max_length=200, blank=True, db_index=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="sweeps"
    )
    # On a Slurm host: the sweep's runs go as one job array, at most this many at once
    # (`--array=0-N%K`); None: one job per run.
    slurm_array_throttle = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name


class Run(models.Model):
    """One command run on one host; its status only changes through services.run_transition."""

    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    name = models.CharField(max_length=200)
    command = models.TextField()
    workdir = models.CharField(max_length=1000, blank=True)
    env = models.JSONField(default=dict, blank=True)
    sweep = models.ForeignKey(
        Sweep, on_delete=models.SET_NULL, null=True, blank=True, related_name="runs"
    )
    plan = models.ForeignKey(
        Plan, on_delete=models.SET_NULL, null=True, blank=True, related_name="runs"
    )
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=12, choices=RunStatus.choices, default=RunStatus.READY)
    # Why it is in its state (a RunReason), written by run_transition with the event. One value is
    # set outside it, as bookkeeping that decides nothing: `host_unreachable` on an active run
    # while its host does not answer (runner.hosts), cleared by the host's next answer
    # (runner.sync). The host's own row records the outage (clusters: state, note); a run event
    # per run per outage would only repeat it, and no transition reads the flag.
    reason = models.CharField(max_length=40, blank=True)
    error = models.TextField(blank=True)
    priority = models.IntegerField(default=0)
    gpus = models.PositiveIntegerField(default=0)
    min_free_mem_mb = models.PositiveIntegerField(null=True, blank=True)
    # What the run takes of its host's CPU slots and memory, GPU runs too (experiments.capacity).
    cpus = models.PositiveIntegerField(default=1)
    memory_mb = models.PositiveIntegerField(null=True, blank=True)
    gpuwrap_config = models.JSONField(default=dict, blank=True)
    host = models.ForeignKey(
        "clusters.Host", on_delete=models.PROTECT, null=True, blank=True, related_name="runs"
    )
    exit_code = models.IntegerField(null=True, blank=True)
    pid = models.IntegerField(null=True, blank=True)
    slurm_job_id = models.CharField(max_length=40, blank=True)
    # On a Slurm host: the run's own sbatch options over the host's (clusters.slurm.OPTION_KEYS),
    # and the job's state as Slurm last said it, raw (bookkeeping that the poll rewrites, like
    # waiting_reason; what a state does to the run goes through run_transition).
    slurm = models.JSONField(default=dict, blank=True)
    slurm_state = models.CharField(max_length=40, blank=True)
    # How long its job ran, as Slurm counted it (squeue's or sacct's elapsed), written with
    # its end: its GPU-hours are this times its GPUs, not Labsite's polls' start and end.
    slurm_elapsed_seconds = models.IntegerField(null=True, blank=True)
    chat_session_id = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="runs"
    )
    parent = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="reruns"
    )
    stop_requested_at = models.DateTimeField(null=True, blank=True)
    # Why a queued run still waits ("needs 2 GPU(s); 1 free on gpu-node-1"): set when it is
    # queued (run_transition, or creation: "waiting for the scheduler's next pass", or why no
    # host could ever take it) and rewritten by scheduler passes outside run_transition, without
    # an event. Bookkeeping that decides nothing (each pass recomputes from capacity); an event
    # per pass per queued run would bury the audit trail.
    waiting_reason = models.CharField(max_length=500, blank=True)
    # How much of the host's output.log / metrics.jsonl the server has copied (the poll's
    # bookkeeping, moved by conditional updates; no state depends on them).
    log_size = models.BigIntegerField(default=0)
    metrics_offset = models.BigIntegerField(default=0)
    metrics_latest = models.JSONField(default=dict, blank=True)
    # The seq of the next Metric row: moved with metrics_offset in one conditional UPDATE, so a
    # poll numbers new rows without counting the old ones.
    metrics_seq = models.PositiveIntegerField(default=0)
    # Launches sent to the host for this attempt (runner.dispatch): a counter for the audit of a
    # launch, reset on placement, that no transition reads; the launch itself is an event.
    dispatch_attempts = models.PositiveIntegerField(default=0)
    # A run sent back to the queue (its GPU was taken meanwhile) starts again in a new directory;
    # log_base is how much of the server's log came from earlier attempts.
    attempt = models.PositiveIntegerField(default=1)
    # The owner asked for this host (else the scheduler chose it and may choose another).
    host_pinned = models.BooleanField(default=False)
    log_base = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    held_at = models.DateTimeField(null=True, blank=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    launched_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["-created_at", "-id"], name="run_newest"),
            # The scheduler reads the queue's head in this order (priority desc, then age).
            models.Index(fields=["status", "-priority", "queued_at", "id"], name="run_queue_order"),
            models.Index(fields=["chat_session_id", "-created_at"], name="run_session"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"


class RunEvent(models.Model):
    """The audit trail: every state change and decision about a run."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    from_status = models.CharField(max_length=12, blank=True)
    to_status = models.CharField(max_length=12, blank=True)
    reason = models.CharField(max_length=40, blank=True)
    message = models.TextField(blank=True)
    actor_kind = models.CharField(max_length=8, choices=ActorKind.choices)
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    actor_token = models.ForeignKey(
        "labsite.ApiToken", on_delete=models.SET_NULL, null=True, blank=True
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["to_status", "id"], name="runevent_to_status")]

    def __str__(self) -> str:
        return f"{self.run_id}: {self.from_status or '-'} -> {self.to_status} ({self.reason})"


class RunTally(models.Model):
    """How many runs there are: one row, kept by triggers on the runs table (migration 0012),
    so that the unfiltered list's `count` is read, not counted (COUNT(*) of 100,000 runs was
    most of an agent's `GET /runs`). No row means no runs: a flush empties both tables."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    runs = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.runs} runs"


class GpuLease(models.Model):
    """A GPU given to a run; the partial unique constraint allows one active lease per GPU."""

    gpu = models.ForeignKey("clusters.Gpu", on_delete=models.PROTECT, related_name="leases")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="leases")
    created_at = models.DateTimeField(auto_now_add=True)
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["gpu"],
                condition=Q(released_at__isnull=True),
                name="one_active_lease_per_gpu",
            )
        ]

    def __str__(self) -> str:
        return f"{self.gpu_id} -> {self.run_id}{'' if self.released_at is None else ' (released)'}"


class Alert(models.Model):
    """Something a person or agent must look at, with the answers it accepts."""

    run = models.ForeignKey(
        Run, on_delete=models.CASCADE, null=True, blank=True, related_name="alerts"
    )
    severity = models.CharField(
        max_length=8, choices=AlertSeverity.choices, default=AlertSeverity.WARNING
    )
    message = models.TextField()
    choices = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=8, choices=AlertStatus.choices, default=AlertStatus.OPEN)
    response = models.CharField(max_length=100, blank=True)
    responded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    responded_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # What the alert is about ("host-key:gpu-1", "budget:<plan id>:<budget>"): while one is open,
    # raising the same key again returns it instead of a second alert. Blank: never deduplicated.
    dedupe_key = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # The database, not a check-then-insert, keeps two workers from opening twins.
            models.UniqueConstraint(
                fields=["dedupe_key"],
                condition=Q(status="open") & ~Q(dedupe_key=""),
                name="alert_one_open_per_dedupe_key",
            )
        ]

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message[:60]}"


class Metric(models.Model):
    """One metric value a run logged to metrics.jsonl, stored once when the poller copies it."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="metrics")
    key = models.CharField(max_length=200)
    step = models.BigIntegerField(null=True, blank=True)
    value = models.FloatField()
    seq = models.PositiveIntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["run", "key", "seq"], name="metric_series")]

    def __str__(self) -> str:
        return f"{self.run_id} {self.key}@{self.step}={self.value}"


class AgentCursor(models.Model):
    """What an agent session (of one user) has already been told by the events endpoint."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    session_id = models.CharField(max_length=200)
    last_run_event_id = models.BigIntegerField(default=0)
    last_alert_id = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "session_id"], name="one_cursor_per_session")
        ]

    def __str__(self) -> str:
        return f"{self.user_id}:{self.session_id}"


class PromptSkill(models.Model):
    """An edited prompt skill; skills shipped in the repository are the defaults."""

    id = models.SlugField(primary_key=True, max_length=100)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    category = models.CharField(max_length=100, blank=True)
    variables = models.JSONField(default=list, blank=True)
    template = models.TextField()
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.id
