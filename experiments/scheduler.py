"""The queue: place queued runs by priority then age on GPUs that are free by policy.

A pass reads capacity once and tracks it in memory while it walks the queue. Two kinds:

- a full pass (the timer) walks every queued run: it places what fits, fails runs whose gpuwrap
  retries ran out (`no_gpu`) and refreshes every waiting reason;
- a quick pass (a kick: a run was created, or ended) places what fits and stops walking as soon
  as nothing more can be placed. A burst of short runs kicks once per ended run, so this pass is
  what must be cheap: it costs the head of the queue, not the whole of it.

Both share one policy (_Pass.consider), so a quick pass never places what a full pass would not.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from types import SimpleNamespace
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from clusters import localuser
from clusters.choices import HostKind, HostState
from clusters.gpus import GpuPolicy
from clusters.models import Gpu, Host
from clusters.services import LOCAL_HOST_NAME, gpu_policy
from experiments import jobs, services
from experiments.actors import Actor
from experiments.choices import ACTIVE, PLAN_CLEARED, RunReason, RunStatus
from experiments.models import Alert, GpuLease, Plan, Run
from labsite import roles

SYSTEM = Actor.system()
QUEUE_FIELDS = (
    "id",
    "priority",
    "gpus",
    "min_free_mem_mb",
    "host_id",
    "created_by_id",
    "queued_at",
    "gpuwrap_config",
    "waiting_reason",
    "effective_plan",
)
QUICK_CHUNK = 64  # rows a quick pass reads at a time from the head of the queue


class _Lost(Exception):
    pass


def _admin_ids() -> frozenset[int]:
    """The lab's admins (superusers hold every role), for a local host that is theirs alone."""
    users = get_user_model().objects.filter(is_active=True)
    return frozenset(
        users.filter(Q(is_superuser=True) | Q(groups__name=roles.ADMIN)).values_list(
            "id", flat=True
        )
    )


def _enabled_hosts() -> Any:
    return Host.objects.filter(enabled=True, kind__in=[HostKind.LOCAL, HostKind.SSH]).exclude(
        state=HostState.KEY_MISMATCH
    )


@dataclass(frozen=True)
class _HostRef:
    """What a pass needs of a host it places on (a Host row has these too)."""

    id: int
    name: str


@dataclass(frozen=True)
class _FreeGpu:
    id: int
    index: int
    memory_free_mb: int
    host: _HostRef


@dataclass
class _Capacity:
    """The pass's view of free GPUs, kept in memory and updated as runs are placed."""

    free: dict[int, list[_FreeGpu]]  # host id -> free GPUs by index
    user_gpus: dict[int, int]  # user id -> GPUs leased to the user's active runs
    # Set where the local host takes admins' runs only (no separate run user): who they are.
    local_admins: frozenset[int] | None = None

    @classmethod
    def load(cls, *, per_user: bool) -> _Capacity:
        """One query for the GPUs, with their host's policy and whether a lease holds them.

        Plain rows, not models: every quick pass reads every GPU of the lab (with 64 GPUs,
        model instances cost 8 ms of CPU per pass, rows 4 ms)."""
        active = GpuLease.objects.filter(gpu=OuterRef("pk"), released_at__isnull=True)
        rows = (
            Gpu.objects.filter(host__in=_enabled_hosts(), present=True)
            .annotate(leased=Exists(active))
            .order_by("host_id", "index")
            .values_list(
                "id",
                "index",
                "memory_total_mb",
                "memory_used_mb",
                "utilization_pct",
                "processes",
                "leased",
                "host_id",
                "host__name",
                "host__gpu_free_max_mem_mb",
                "host__gpu_free_max_util_pct",
            )
        )
        free: dict[int, list[_FreeGpu]] = defaultdict(list)
        hosts: dict[int, tuple[_HostRef, GpuPolicy]] = {}
        for gpu_id, index, total, used, util, procs, leased, host_id, name, mem, pct in rows:
            if host_id not in hosts:
                hosts[host_id] = (_HostRef(host_id, name), gpu_policy(mem, pct))
            host, policy = hosts[host_id]
            foreign = any(not p.get("run_id") for p in procs)
            if (
                not leased
                and not foreign
                and used <= policy.max_memory_used_mb
                and util <= policy.max_utilization_pct
            ):
                free[host_id].append(_FreeGpu(gpu_id, index, max(0, total - used), host))
        user_gpus: dict[int, int] = defaultdict(int)
        if per_user:  # only the lab's per-user cap reads it
            for user_id, n in Run.objects.filter(status__in=list(ACTIVE)).values_list(
                "created_by_id", "gpus"
            ):
                user_gpus[user_id] += n
        admins = None if localuser.members_may_run_locally() else _admin_ids()
        return cls(free=free, user_gpus=user_gpus, local_admins=admins)

    def may_use_local(self, user_id: int | None) -> bool:
        return self.local_admins is None or user_id in self.local_admins

    def may_use(self, host: _HostRef | Host, user_id: int | None) -> bool:
        """Whether the run's owner may run on this host (the local host may be admins' only)."""
        return host.name != LOCAL_HOST_NAME or self.may_use_local(user_id)

    @cached_property
    def hosts(self) -> dict[int, Host]:
        """Every host that may get work; read only when a CPU run or a waiting reason needs it."""
        return {h.id: h for h in _enabled_hosts()}

    def free_total(self) -> int:
        return sum(len(gpus) for gpus in self.free.values())

    def take(self, host: _HostRef | Host, gpus: list[_FreeGpu], user_id: int | None) -> None:
        taken = {g.id for g in gpus}
        self.free[host.id] = [g for g in self.free[host.id] if g.id not in taken]
        if user_id is not None:
            self.user_gpus[user_id] += len(gpus)

    def describe(self, run: Any, need_mb: int) -> str:
        mem = f" with {run.min_free_mem_mb} MB free" if run.min_free_mem_mb else ""
        hosts = [self.hosts[run.host_id]] if run.host_id in self.hosts else self.gpu_hosts()
        counts = ", ".join(
            f"{sum(g.memory_free_mb >= need_mb for g in self.free.get(h.id, []))} free on {h.name}"
            if self.may_use(h, run.created_by_id)
            else f"{h.name} takes admins' runs only"
            for h in hosts
        )
        return f"needs {run.gpus} GPU(s){mem}; {counts or 'no GPU host is enabled'}"

    def gpu_hosts(self) -> list[Host]:
        return sorted(
            (h for h in self.hosts.values() if h.gpu_source != "none"), key=lambda h: h.name
        )

    def default_host(self, user_id: int | None) -> Host | None:
        """Where a CPU run without a host goes: the local host first, where its owner may."""
        usable = sorted(
            (h for h in self.hosts.values() if self.may_use(h, user_id)), key=lambda h: h.name
        )
        local = next((h for h in usable if h.name == LOCAL_HOST_NAME), None)
        return local or next(iter(usable), None)

    def pick(self, run: Any, need_mb: int) -> tuple[_HostRef, list[_FreeGpu]] | None:
        """GPUs of one host for the run: the host that fits it most tightly (keeps big holes)."""
        best: tuple[int, str, _HostRef, list[_FreeGpu]] | None = None
        for host_id, gpus in self.free.items():
            if not gpus or (run.host_id and host_id != run.host_id):
                continue
            host = gpus[0].host
            if not self.may_use(host, run.created_by_id):
                continue
            fitting = [g for g in gpus if g.memory_free_mb >= need_mb]
            if len(fitting) >= run.gpus and (best is None or (len(fitting), host.name) < best[:2]):
                best = (len(fitting), host.name, host, fitting[: run.gpus])
        return (best[2], best[3]) if best else None


def _place(run: Any, host: _HostRef | Host, gpus: list[_FreeGpu]) -> bool | None:
    """Lease the GPUs and move queued -> launching in ONE transaction.

    True when placed; False when the run was no longer queued (stopped meanwhile); None when
    one of the GPUs was leased by someone else first (the constraint said no).
    """
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
                raise _Lost()
            jobs.dispatch_later(run.id)
    except IntegrityError:
        return None
    except _Lost:
        return False
    return True


def _gave_up(run: Any, now: datetime) -> bool:
    """gpuwrap retries x retry_delay_seconds of waiting for GPUs, then the run fails (no_gpu)."""
    wrap = run.gpuwrap_config or {}
    retries = wrap.get("retries", -1)
    if retries is None or retries < 0 or run.queued_at is None:
        return False
    budget = retries * float(wrap.get("retry_delay_seconds", 30))
    return (now - run.queued_at).total_seconds() > budget


def plan_gpu_hours(plan_ids: list[str]) -> dict[str, float]:
    """GPU-hours used so far by the runs of each plan (directly or through a sweep)."""
    now = timezone.now()
    used: dict[str, float] = defaultdict(float)
    rows = (
        Run.objects.filter(
            Q(plan_id__in=plan_ids) | Q(plan__isnull=True, sweep__plan_id__in=plan_ids)
        )
        .exclude(started_at=None)
        .values_list("plan_id", "sweep__plan_id", "gpus", "started_at", "ended_at")
    )
    for plan_id, sweep_plan_id, gpus, started, ended in rows:
        if started is None:
            continue
        hours = ((ended or now) - started).total_seconds() / 3600
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
            if not Alert.objects.filter(message=message).exists():
                services.alert_raise(message=message, severity="warning", choices=["acknowledge"])
    return over


def _queue(*, gpu: bool) -> Any:
    return (
        Run.objects.filter(status=RunStatus.QUEUED)
        .filter(Q(gpus__gt=0) if gpu else Q(gpus=0))
        .annotate(effective_plan=Coalesce("plan_id", "sweep__plan_id"))
        .values(*QUEUE_FIELDS)
        .order_by("-priority", "queued_at", "id")
    )


def _head_first(queue: Any, first: int = QUICK_CHUNK) -> Iterator[dict[str, Any]]:
    """The queue in order, QUICK_CHUNK rows at a time (keyset, so placed runs shift nothing).

    A queued run always has queued_at (run_transition stamps it); should one lack it, the walk
    ends there and the next full pass, which reads the queue whole, covers the rest.
    """
    after, size = None, first
    while True:
        page = queue
        if after is not None:
            p, q, i = after["priority"], after["queued_at"], after["id"]
            if q is None:
                return
            page = page.filter(
                Q(priority__lt=p)
                | Q(priority=p, queued_at__gt=q)
                | Q(priority=p, queued_at=q, id__gt=i)
            )
        rows = list(page[:size])
        yield from rows
        if len(rows) < size:
            return
        after, size = rows[-1], QUICK_CHUNK


@dataclass
class _Pass:
    """One walk of the queue: capacity, the time, and what it decided about each run."""

    capacity: _Capacity
    budgets: dict[str, str] | None = None  # plan id -> why its runs wait; read when first needed
    now: datetime = field(default_factory=timezone.now)
    cap: int = 0
    backfill_seconds: float = 0.0
    reasons: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    unplaceable: dict[tuple[int, int, int | None, bool], str] = field(default_factory=dict)
    holding: str | None = None  # a big run past the backfill bound: runs behind it wait
    placed: int = 0
    expired: int = 0
    waiting: int = 0

    @classmethod
    def start(cls, *, full: bool) -> _Pass:
        """A full pass checks every budget (and alerts the PI) whether or not a run waits on it;
        a quick pass reads budgets only when it meets a run that belongs to a plan."""
        lab = settings.LABSITE
        cap = int(lab["MAX_GPUS_PER_USER"])
        return cls(
            capacity=_Capacity.load(per_user=bool(cap)),
            budgets=_over_budget() if full else None,
            cap=cap,
            backfill_seconds=lab["BACKFILL_SECONDS"],
        )

    def over_budget(self, run: Any) -> str | None:
        if not run.effective_plan:
            return None
        if self.budgets is None:
            self.budgets = _over_budget()
        return self.budgets.get(run.effective_plan)

    def blocked(self) -> bool:
        """Nothing more can be placed on a GPU in this pass."""
        return self.holding is not None or self.capacity.free_total() == 0

    def consider_cpu(self, run: Any) -> None:
        if over := self.over_budget(run):
            self.wait(run, over)
            return
        hosts = self.capacity.hosts
        host = (
            hosts.get(run.host_id) if run.host_id else self.capacity.default_host(run.created_by_id)
        )
        if host is None:
            why = "its host is disabled or unreachable" if run.host_id else "no enabled host"
            if not run.host_id and self.capacity.local_admins is not None:
                why = localuser.admins_only_reason()
            self.wait(run, why)
        elif not self.capacity.may_use(host, run.created_by_id):
            self.wait(run, localuser.admins_only_reason())
        elif _place(run, host, []):
            self.placed += 1

    def consider_gpu(self, run: Any) -> None:
        if over := self.over_budget(run):
            self.wait(run, over)
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
        need_mb = math.ceil(1.2 * run.min_free_mem_mb) if run.min_free_mem_mb else 0
        # Runs that ask the same thing get the same answer until capacity changes: memoize.
        shape = (run.gpus, need_mb, run.host_id, self.capacity.may_use_local(run.created_by_id))
        choice = None
        if shape not in self.unplaceable:
            choice = self.capacity.pick(run, need_mb)
            if choice is None:
                self.unplaceable[shape] = self.capacity.describe(run, need_mb)
        if choice is None:
            self.wait(run, self.unplaceable[shape])
            waited = (self.now - run.queued_at).total_seconds() if run.queued_at else 0
            if waited > self.backfill_seconds:
                self.holding = run.id
            return
        host, gpus = choice
        placed = _place(run, host, gpus)
        if placed:
            self.placed += 1
            self.unplaceable.clear()
            self.capacity.take(host, gpus, run.created_by_id)
        elif placed is None:
            # Another pass got there first: those GPUs are not free, try the run elsewhere.
            self.capacity.take(host, gpus, user_id=None)
            self.consider_gpu(run)

    def expire(self, run: Any) -> None:
        wrap = run.gpuwrap_config
        if services.run_transition(
            run_id=run.id,
            to=RunStatus.FAILED,
            from_=[RunStatus.QUEUED],
            actor=SYSTEM,
            reason=RunReason.NO_GPU,
            message=f"no GPU after {wrap.get('retries')} retries x "
            f"{wrap.get('retry_delay_seconds', 30)} s",
            fields={"error": "no free GPU in time: " + (run.waiting_reason or "")},
        ):
            self.expired += 1

    def wait(self, run: Any, reason: str) -> None:
        """The run stays queued; its reason is written only where it changed."""
        self.waiting += 1
        if run.waiting_reason != reason[:500]:
            self.reasons[reason[:500]].append(run.id)

    def write_reasons(self) -> None:
        for reason, ids in self.reasons.items():
            Run.objects.filter(pk__in=ids, status=RunStatus.QUEUED).update(waiting_reason=reason)

    def result(self) -> dict[str, int]:
        return {"placed": self.placed, "expired": self.expired, "waiting": self.waiting}


def schedule_pass(*, full: bool = True, cpu: bool = True) -> dict[str, int]:
    """Place queued runs by priority then age on GPUs that are free by policy.

    CPU runs (`gpus: 0`) take no GPU, so they are walked on their own and never wait behind GPU
    runs. A run that cannot be placed keeps a visible reason. A big run blocked longer than the
    lab's backfill bound holds the capacity: smaller runs behind it wait instead of passing it
    for ever. A quick pass (`full=False`) stops at the first run once nothing more fits, and
    with `cpu=False` (a run ended: GPUs freed, no host) it reads only the GPU runs' queue.
    """
    pass_ = _Pass.start(full=full)
    if cpu or full:
        for row in _head_first(_queue(gpu=False)):
            pass_.consider_cpu(SimpleNamespace(**row))
    gpu_queue = _queue(gpu=True)
    if full:
        # Plain rows, not model instances: a full pass may walk a queue of tens of thousands.
        for row in gpu_queue.iterator(chunk_size=2000):
            pass_.consider_gpu(SimpleNamespace(**row))
    elif not pass_.blocked():
        # A GPU that frees usually goes to one of the first few runs: read those first.
        first = min(QUICK_CHUNK, 8 + 2 * pass_.capacity.free_total())
        for row in _head_first(gpu_queue, first):
            pass_.consider_gpu(SimpleNamespace(**row))
            if pass_.blocked():
                break
    pass_.write_reasons()
    return pass_.result()
