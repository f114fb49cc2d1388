"""Status words and the sets that matter, next to each other.

A run's `status` changes only through services.run_transition / runs_transition (a conditional
UPDATE and a RunEvent). Three kinds of run fields change outside them, on purpose, as
bookkeeping that never decides a state, each documented on its field in models.Run:
`waiting_reason` (rewritten by every scheduler pass: an event per pass would bury the audit
trail), `reason = RunReason.HOST_UNREACHABLE` (a flag while the host does not answer; the host
row records the outage), and counters and offsets (`dispatch_attempts`, `log_size`,
`metrics_offset`, `metrics_seq`). `attempt` is not one of them: it moves only with a requeue,
through run_transition.
"""

from django.db import models


class RunStatus(models.TextChoices):
    READY = "ready", "Ready"
    HELD = "held", "Held (plan not approved)"
    QUEUED = "queued", "Queued"
    LAUNCHING = "launching", "Launching"
    RUNNING = "running", "Running"
    FINISHED = "finished", "Finished"
    FAILED = "failed", "Failed"
    STOPPED = "stopped", "Stopped"


TERMINAL = frozenset({RunStatus.FINISHED, RunStatus.FAILED, RunStatus.STOPPED})
ACTIVE = frozenset({RunStatus.LAUNCHING, RunStatus.RUNNING})
WAITING = frozenset({RunStatus.READY, RunStatus.HELD, RunStatus.QUEUED})
NON_TERMINAL = frozenset(RunStatus) - TERMINAL

# to -> the states a run may come from. run_transition's conditional UPDATE uses these.
RUN_TRANSITIONS: dict[str, frozenset[str]] = {
    RunStatus.HELD: frozenset({RunStatus.READY, RunStatus.QUEUED}),
    RunStatus.QUEUED: frozenset(
        {RunStatus.READY, RunStatus.HELD, RunStatus.LAUNCHING, RunStatus.RUNNING}
    ),
    # From running: a Slurm job requeued (preempted, a node failed) waits in Slurm again.
    RunStatus.LAUNCHING: frozenset({RunStatus.QUEUED, RunStatus.RUNNING}),
    RunStatus.RUNNING: frozenset({RunStatus.LAUNCHING}),
    RunStatus.FINISHED: frozenset({RunStatus.LAUNCHING, RunStatus.RUNNING}),
    RunStatus.FAILED: frozenset({RunStatus.QUEUED, RunStatus.LAUNCHING, RunStatus.RUNNING}),
    RunStatus.STOPPED: NON_TERMINAL,
}

# Which timestamp a state stamps when a run enters it.
STATE_TIMESTAMP: dict[str, str] = {
    RunStatus.HELD: "held_at",
    RunStatus.QUEUED: "queued_at",
    RunStatus.LAUNCHING: "launched_at",
    RunStatus.RUNNING: "started_at",
    RunStatus.FINISHED: "ended_at",
    RunStatus.FAILED: "ended_at",
    RunStatus.STOPPED: "ended_at",
}


class RunReason(models.TextChoices):
    EXIT_CODE = "exit_code"
    CUDA_OOM = "cuda_oom"
    LOST = "lost"
    LAUNCH_ERROR = "launch_error"
    TIMEOUT = "timeout"
    HOST_UNREACHABLE = "host_unreachable"
    NO_GPU = "no_gpu"
    PLAN_REJECTED = "plan_rejected"
    PLAN_NOT_APPROVED = "plan_not_approved"
    USER_STOP = "user_stop"
    # Slurm's own endings (clusters.slurm.ending): host memory (distinct from cuda_oom), a node
    # that failed, a job cancelled in Slurm (not through Labsite), a deadline, a preemption.
    OOM = "oom"
    NODE_FAIL = "node_fail"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    PREEMPTED = "preempted"


class PlanStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    PENDING_REVIEW = "pending_review", "Pending review"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
    CHANGES_REQUESTED = "changes_requested", "Changes requested"
    EXECUTING = "executing", "Executing"
    COMPLETED = "completed", "Completed"
    ARCHIVED = "archived", "Archived"


# A plan in one of these lets its work touch a GPU.
PLAN_CLEARED = frozenset({PlanStatus.APPROVED, PlanStatus.EXECUTING, PlanStatus.COMPLETED})
PLAN_DECIDABLE = frozenset({PlanStatus.DRAFT, PlanStatus.PENDING_REVIEW})
PLAN_SUBMITTABLE = frozenset({PlanStatus.DRAFT, PlanStatus.CHANGES_REQUESTED})
PLAN_ARCHIVABLE = frozenset(PlanStatus) - {PlanStatus.ARCHIVED, PlanStatus.EXECUTING}

PLAN_SECTIONS = (
    "Objective",
    "Compute Setup",
    "Approach",
    "Parameters to Sweep",
    "Metrics",
    "Success Criteria",
    "Risks & Mitigations",
    "Estimated Effort",
)


class SweepKind(models.TextChoices):
    GRID = "grid", "Grid"
    WILD = "wild", "Wild (agent-driven)"


class ActorKind(models.TextChoices):
    USER = "user", "User"
    AGENT = "agent", "API token"
    SYSTEM = "system", "System"


class AlertSeverity(models.TextChoices):
    INFO = "info", "Info"
    WARNING = "warning", "Warning"
    CRITICAL = "critical", "Critical"


class AlertStatus(models.TextChoices):
    OPEN = "open", "Open"
    RESOLVED = "resolved", "Resolved"
