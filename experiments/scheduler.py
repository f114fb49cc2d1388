"""The queue: place queued runs by priority then age on GPUs that are free by policy.

A pass reads capacity once (experiments.capacity) and tracks it in memory while it walks the
queue. Two kinds:

- a full pass (the timer) walks every queued run: it places what fits, fails runs whose gpuwrap
  retries ran out (`no_gpu`) and refreshes every waiting reason; it is also the safety net that
  releases a held run whose plan is approved (an approval releases its runs itself, in the same
  transaction; this catches whatever a crash or a direct edit left behind);
- a quick pass (a kick: a run was created, or ended) places what fits and stops walking as soon
  as nothing more can be placed. A burst of short runs kicks once per ended run, so this pass is
  what must be cheap: it costs the head of the queue, not the whole of it.

Both share one policy (_Pass.consider_*), so a quick pass never places what a full pass would
not. Runs wait with a reason (`waiting_reason`): bookkeeping that says why, never a state.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.db.models.fields.json import KT
from django.db.models.functions import Coalesce
from django.utils import timezone

from experiments import jobs, services
from experiments.actors import Actor
from experiments.capacity import HOST_GONE, NO_HOST, Capacity, FreeGpu, HostRef, need_mb
from experiments.choices import PLAN_CLEARED, RunReason, RunStatus
from experiments.models import GpuLease, Plan, Run
from labsite.compiled import Compiled

SYSTEM = Actor.system()
QUICK_CHUNK = 64  # rows a quick pass reads at a time from the head of the queue
QUICK_FIRST = 8  # ... and the first time: a freed GPU usually goes to one of the first runs


@dataclass(frozen=True, slots=True)
class QueuedRun:
    """One row of the queue: what a pass needs of a queued run (read as plain values)."""

    id: str
    priority: int
    gpus: int
    min_free_mem_mb: int | None
    cpus: int
    memory_mb: int | None
    host_id: int | None
    created_by_id: int
    queued_at: datetime | None
    waiting_reason: str
    effective_plan: str | None  # the run's plan, or its sweep's
    # gpuwrap_config's two numbers, read by the database: text on PostgreSQL, numbers on SQLite,
    # None where unset. Decoding the whole JSON per row was a third of a full pass's CPU.
    retries: str | int | None
    retry_delay_seconds: str | float | None


QUEUE_FIELDS = tuple(QueuedRun.__dataclass_fields__)


class Placement(enum.Enum):
    """What became of an attempt to place a run."""

    PLACED = "placed"  # leased and moved to launching; its dispatch is on its way
    GONE = "gone"  # no longer queued (stopped meanwhile): nothing to do
    TAKEN = "taken"  # a GPU was leased by another pass first (the constraint said no)


def _place(run: QueuedRun, host: HostRef, gpus: list[FreeGpu]) -> Placement:
    """Lease the GPUs and move queued -> launching in ONE transaction."""
    try:
        with transaction.atomic():
            if gpus:
                GpuLease.objects.bulk_create(GpuLease(gpu_id=gpu.id, run_id=run.id) for gpu in gpus)
            detail = f" GPUs {[g.index for g in gpus]}" if gpus else ""
            if not services.run_transition(
                run_id=run.id,
                to=RunStatus.LAUNCHING,
                from_=[RunStatus.QUEUED],
                actor=SYSTEM,
                message=f"placed on {host.name}{detail}",
                fields={"host_id": host.id, "waiting_reason": "", "dispatch_attempts": 0},
            ):
                transaction.set_rollback(True)  # and the leases with it
                return Placement.GONE
            jobs.dispatch_later(run.id)
    except IntegrityError:
        return Placement.TAKEN
    return Placement.PLACED


def _retry_delay(run: QueuedRun) -> float:
    return 30.0 if run.retry_delay_seconds is None else float(run.retry_delay_seconds)


def _gave_up(run: QueuedRun, now: datetime) -> bool:
    """gpuwrap retries x retry_delay_seconds of waiting for GPUs, then the run fails (no_gpu)."""
    if run.retries is None or run.queued_at is None:
        return False
    retries = int(run.retries)
    if retries < 0:
        return False
    return (now - run.queued_at).total_seconds() > retries * _retry_delay(run)


def release_cleared() -> list[str]:
    """Queue the held runs whose plan is approved: the full pass's safety net.

    An approval releases its plan's runs itself, under the plan's lock, so this finds nothing
    unless something went around it (a plan row edited by hand, a release lost to a crash in
    older code). One query when there is nothing to release."""
    cleared = list(PLAN_CLEARED)
    held = Run.objects.filter(status=RunStatus.HELD).filter(
        Q(plan__status__in=cleared) | Q(plan__isnull=True, sweep__plan__status__in=cleared)
    )
    ids = list(held.order_by().values_list("id", flat=True))
    if not ids:
        return []
    return services.runs_transition(
        run_ids=ids,
        to=RunStatus.QUEUED,
        from_=[RunStatus.HELD],
        actor=SYSTEM,
        reason="plan_approved",
        message="released by the scheduler's full pass: its plan is approved",
    )


def plan_gpu_hours(plan_ids: list[str]) -> dict[str, float]:
    """GPU-hours used so far by the runs of each plan (directly or through a sweep): each
    run's time (a Slurm job's elapsed time, as Slurm counted it) times its GPUs."""
    now = timezone.now()
    used: dict[str, float] = defaultdict(float)
    rows = (
        Run.objects.filter(
            Q(plan_id__in=plan_ids) | Q(plan__isnull=True, sweep__plan_id__in=plan_ids)
        )
        .exclude(started_at=None)
        .values_list(
            "plan_id", "sweep__plan_id", "gpus", "started_at", "ended_at", "slurm_elapsed_seconds"
        )
    )
    for plan_id, sweep_plan_id, gpus, started, ended, elapsed in rows:
        if started is None:
            continue
        # A Slurm job's own run time where Slurm said it; else from its start to its end.
        seconds = elapsed if elapsed is not None else ((ended or now) - started).total_seconds()
        hours = seconds / 3600
        used[plan_id or sweep_plan_id] += hours * max(gpus, 1)
    return used


def _over_budget() -> dict[str, str]:
    """Plans past their GPU-hour budget: no new launches, and the PI is told once."""
    budgets = {
        plan_id: float(budget or 0)
        for plan_id, budget in Plan.objects.filter(
            gpu_hours_budget__isnull=False, status__in=list(PLAN_CLEARED)
        ).values_list("id", "gpu_hours_budget")
    }
    if not budgets:
        return {}
    used = plan_gpu_hours(list(budgets))
    over = {}
    for plan_id, budget in budgets.items():
        if used[plan_id] >= budget:
            over[plan_id] = (
                f"plan {plan_id} has used {used[plan_id]:.1f} of its {budget:g} GPU-hour budget; "
                "a PI can raise it"
            )
            message = (
                f"Plan {plan_id} reached its GPU-hour budget ({budget:g} h): new launches wait."
            )
            # Every pass sees the plan still over: told once per budget, even once answered.
            services.alert_raise(
                message=message,
                severity="warning",
                choices=["acknowledge"],
                dedupe_key=f"budget:{plan_id}:{budget:g}",
                once=True,
            )
    return over


def _queue(*, gpu: bool) -> QuerySet[Run, tuple[Any, ...]]:
    return (
        Run.objects.filter(status=RunStatus.QUEUED)
        .filter(Q(gpus__gt=0) if gpu else Q(gpus=0))
        .annotate(
            effective_plan=Coalesce("plan_id", "sweep__plan_id"),
            retries=KT("gpuwrap_config__retries"),
            retry_delay_seconds=KT("gpuwrap_config__retry_delay_seconds"),
        )
        .values_list(*QUEUE_FIELDS)
        .order_by("-priority", "queued_at", "id")
    )


def _rows(queue: QuerySet[Run, tuple[Any, ...]]) -> Iterator[QueuedRun]:
    """The whole queue, 2,000 rows at a time (a full pass may walk tens of thousands); tuples,
    not .values()'s dicts, into the dataclass: one dict less per row."""
    for row in queue.iterator(chunk_size=2000):
        yield QueuedRun(*row)


# The head of each queue, compiled once per process (labsite.compiled): what every quick pass
# reads first. Later pages, rarer, go through the ORM.
_HEADS = {
    (gpu, size): Compiled(lambda gpu=gpu, size=size: _queue(gpu=gpu)[:size], arity=0)
    for gpu in (False, True)
    for size in (QUICK_FIRST, QUICK_CHUNK)
}


def _head_first(*, gpu: bool, first: int = QUICK_CHUNK) -> Iterator[QueuedRun]:
    """The queue in order, QUICK_CHUNK rows at a time (keyset, so placed runs shift nothing).

    A queued run always has queued_at (run_transition stamps it); should one lack it, the walk
    ends there and the next full pass, which reads the queue whole, covers the rest.
    """
    rows = [QueuedRun(*row) for row in _HEADS[gpu, first].rows()]
    size = first
    while True:
        yield from rows
        if len(rows) < size:
            return
        last, size = rows[-1], QUICK_CHUNK
        p, q, i = last.priority, last.queued_at, last.id
        if q is None:
            return
        page = _queue(gpu=gpu).filter(
            Q(priority__lt=p)
            | Q(priority=p, queued_at__gt=q)
            | Q(priority=p, queued_at=q, id__gt=i)
        )
        rows = [QueuedRun(*row) for row in page[:size]]


@dataclass
class _Pass:
    """One walk of the queue: capacity, the time, and what it decided about each run."""

    capacity: Capacity
    budgets: dict[str, str] | None = None  # plan id -> why its runs wait; read when first needed
    now: datetime = field(default_factory=timezone.now)
    cap: int = 0
    backfill_seconds: float = 0.0
    reasons: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    unplaceable: dict[tuple[int, int, int | None, bool, int, int | None], str] = field(
        default_factory=dict
    )
    holding: str | None = None  # a big run past the backfill bound: runs behind it wait
    placed: int = 0
    expired: int = 0
    waiting: int = 0
    released: int = 0

    @classmethod
    def start(cls, *, full: bool) -> _Pass:
        """A full pass checks every budget (and alerts the PI) whether or not a run waits on it;
        a quick pass reads budgets only when it meets a run that belongs to a plan."""
        lab = settings.LABSITE
        cap = int(lab["MAX_GPUS_PER_USER"])
        return cls(
            capacity=Capacity.load(per_user=bool(cap)),
            budgets=_over_budget() if full else None,
            cap=cap,
            backfill_seconds=float(lab["BACKFILL_SECONDS"]),
        )

    def over_budget(self, run: QueuedRun) -> str | None:
        if not run.effective_plan:
            return None
        if self.budgets is None:
            self.budgets = _over_budget()
        return self.budgets.get(run.effective_plan)

    def blocked(self) -> bool:
        """Nothing more can be placed on a GPU in this pass."""
        return self.holding is not None or self.capacity.free_total() == 0

    def consider_cpu(self, run: QueuedRun) -> None:
        """A CPU run goes to its own host, or the first (local first, then by name) with the
        CPU slots and memory it asks; else it waits, saying what each host has free."""
        if over := self.over_budget(run):
            self.wait(run, over)
            return
        capacity = self.capacity
        if slurm := capacity.slurm_host(run):
            self.place_slurm(run, slurm)
            return
        if run.host_id:
            host = capacity.hosts.get(run.host_id)
            if host is None:
                self.wait(run, HOST_GONE)
            elif not capacity.may_use(host, run.created_by_id):
                self.wait(run, capacity.admins_only())
            elif not capacity.fits_cpu(host.id, run):
                self.wait(run, capacity.describe_cpu(run, [host]))
            else:
                self.place_cpu(run, host)
            return
        usable = capacity.cpu_hosts(run.created_by_id)
        if not usable:
            self.wait(run, capacity.admins_only() if capacity.local_admins is not None else NO_HOST)
            return
        host = next((h for h in usable if capacity.fits_cpu(h.id, run)), None)
        if host is None:
            self.wait(run, capacity.describe_cpu(run, usable))
        else:
            self.place_cpu(run, host)

    def place_slurm(self, run: QueuedRun, host: HostRef) -> None:
        """To Slurm at once: it queues the job, picks its node and pins its GPUs; the run stays
        `launching`, with Slurm's reason, until its job runs (runner.slurm)."""
        if _place(run, host, []) is Placement.PLACED:
            self.placed += 1

    def place_cpu(self, run: QueuedRun, host: HostRef) -> None:
        if _place(run, host, []) is Placement.PLACED:
            self.placed += 1
            self.capacity.take_cpu(host.id, run)

    def consider_gpu(self, run: QueuedRun) -> None:
        if over := self.over_budget(run):
            self.wait(run, over)
            return
        if slurm := self.capacity.slurm_host(run):
            self.place_slurm(run, slurm)
            return
        if _gave_up(run, self.now):
            self.expire(run)
            return
        in_use = self.capacity.user_gpus[run.created_by_id]
        if self.cap and in_use + run.gpus > self.cap:
            why = f"its owner has {in_use} of {self.cap} GPUs in use (the lab's cap)"
            self.wait(run, why)
            return
        if self.holding is not None:
            self.wait(
                run, f"waiting behind run {self.holding}, which is holding GPUs until it fits"
            )
            return
        mb = need_mb(run.min_free_mem_mb)
        # Runs that ask the same thing get the same answer until capacity changes: memoize.
        shape = (
            run.gpus,
            mb,
            run.host_id,
            self.capacity.may_use_local(run.created_by_id),
            run.cpus,
            run.memory_mb,
        )
        choice = None
        if shape not in self.unplaceable:
            choice = self.capacity.pick(run, mb)
            if choice is None:
                self.unplaceable[shape] = self.capacity.describe(run, mb)
        if choice is None:
            self.wait(run, self.unplaceable[shape])
            waited = (self.now - run.queued_at).total_seconds() if run.queued_at else 0
            if waited > self.backfill_seconds:
                self.holding = run.id
            return
        host, gpus = choice
        placement = _place(run, host, gpus)
        if placement is Placement.PLACED:
            self.placed += 1
            self.unplaceable.clear()
            self.capacity.take(host, gpus, run.created_by_id)
            self.capacity.take_cpu(host.id, run)
        elif placement is Placement.TAKEN:
            # Another pass got there first: those GPUs are not free, try the run elsewhere.
            self.capacity.take(host, gpus, user_id=None)
            self.consider_gpu(run)

    def expire(self, run: QueuedRun) -> None:
        if services.run_transition(
            run_id=run.id,
            to=RunStatus.FAILED,
            from_=[RunStatus.QUEUED],
            actor=SYSTEM,
            reason=RunReason.NO_GPU,
            message=f"no GPU after {run.retries} retries x {_retry_delay(run):g} s",
            fields={"error": "no free GPU in time: " + (run.waiting_reason or "")},
        ):
            self.expired += 1

    def wait(self, run: QueuedRun, reason: str) -> None:
        """The run stays queued; its reason is written only where it changed."""
        self.waiting += 1
        reason = reason[:500]
        if run.waiting_reason != reason:
            self.reasons[reason].append(run.id)

    def write_reasons(self) -> None:
        """One UPDATE per distinct reason. Not through run_transition, and no event: a reason is
        bookkeeping that says why a run waits, rewritten by every pass (an event each time would
        bury the audit trail), and nothing reads it to decide a state (see models.Run)."""
        for reason, ids in self.reasons.items():
            Run.objects.filter(pk__in=ids, status=RunStatus.QUEUED).update(waiting_reason=reason)

    def result(self) -> dict[str, int]:
        counts = {"placed": self.placed, "expired": self.expired, "waiting": self.waiting}
        return counts | ({"released": self.released} if self.released else {})


def schedule_pass(*, full: bool = True, cpu: bool = True, gpu: bool = True) -> dict[str, int]:
    """Place queued runs by priority then age on GPUs that are free by policy.

    CPU runs (`gpus: 0`) take no GPU, so they are walked on their own and never wait behind GPU
    runs. A run that cannot be placed keeps a visible reason. A big run blocked longer than the
    lab's backfill bound holds the capacity: smaller runs behind it wait instead of passing it
    for ever. A quick pass (`full=False`) stops at the first run once nothing more fits, and
    with `cpu=False` (a GPU run was queued) it reads only the GPU runs' queue, with `gpu=False`
    (a CPU run was queued: nothing freed for GPU runs) only the CPU runs'. A full
    pass first queues held runs whose plan is approved (release_cleared), then walks them too.
    """
    released = release_cleared() if full else []
    pass_ = _Pass.start(full=full)
    pass_.released = len(released)
    if cpu or full:
        for run in _head_first(gpu=False):
            if not full and run.host_id is None and pass_.capacity.cpu_full():
                break  # the rest wait as they are; the timer's full pass words their reasons
            pass_.consider_cpu(run)
    if full:
        for run in _rows(_queue(gpu=True)):
            pass_.consider_gpu(run)
    elif gpu:
        # A GPU that frees usually goes to one of the first few runs: read those first, and
        # read the GPUs only once a GPU run waits (a CPU run's kick then costs no GPU query).
        for run in _head_first(gpu=True, first=QUICK_FIRST):
            # A pinned run may be Slurm's (which needs none of the lab's GPUs): considered.
            if run.host_id is None and pass_.blocked():
                break
            pass_.consider_gpu(run)
    pass_.write_reasons()
    return pass_.result()
