"""What the lab's enabled hosts can give a run: free GPUs and CPU slots now, and whether any
host ever could.

The scheduler reads a Capacity once per pass, each part (GPUs, hosts, CPU slots in use) when
the walk first needs it, and keeps it in memory while it walks the queue; run creation asks
`never_fits` once per request (one query, whatever the size of a grid). Their reads are
compiled once per process (labsite.compiled). Both word a run's waiting reason with `needs()`,
so the reason a run is given when it is created and the one a pass writes later read alike.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from django.contrib.auth import get_user_model
from django.db.models import Exists, OuterRef, Q, QuerySet, Sum

from clusters import localuser
from clusters.choices import GpuSource, HostKind, HostState
from clusters.gpus import GpuPolicy
from clusters.models import Gpu, Host
from clusters.services import LOCAL_HOST_NAME, gpu_policy
from experiments.choices import ACTIVE
from experiments.models import GpuLease, Run
from labsite import roles
from labsite.compiled import Compiled

# The reason a run has from the moment it is queued until a pass looks at it.
PENDING_PASS = "waiting for the scheduler's next pass"
NO_GPU_HOST = "no GPU host is enabled"
NO_HOST = "no enabled host"
HOST_GONE = "its host is disabled or unreachable"


class Ask(Protocol):
    """What a run asks of a host: a queue row, or a run being created."""

    @property
    def gpus(self) -> int: ...
    @property
    def min_free_mem_mb(self) -> int | None: ...
    @property
    def cpus(self) -> int: ...
    @property
    def memory_mb(self) -> int | None: ...
    @property
    def host_id(self) -> int | None: ...
    @property
    def created_by_id(self) -> int | None: ...


def needs_cpu(cpus: int, memory_mb: int | None) -> str:
    """The first half of a waiting reason for CPUs: "needs 2 CPU(s) and 4000 MB"."""
    return f"needs {cpus} CPU(s)" + (f" and {memory_mb} MB" if memory_mb else "")


def needs(gpus: int, min_free_mem_mb: int | None) -> str:
    """The first half of every GPU run's waiting reason: "needs 2 GPU(s) with 9000 MB free"."""
    mem = f" with {min_free_mem_mb} MB free" if min_free_mem_mb else ""
    return f"needs {gpus} GPU(s){mem}"


def need_mb(min_free_mem_mb: int | None) -> int:
    """The free memory a GPU must have for the run: 1.2x what it asked (headroom)."""
    return math.ceil(1.2 * min_free_mem_mb) if min_free_mem_mb else 0


def enabled_hosts() -> QuerySet[Host]:
    """The hosts the scheduler places on (Slurm places its own jobs)."""
    return Host.objects.filter(enabled=True, kind__in=[HostKind.LOCAL, HostKind.SSH]).exclude(
        state=HostState.KEY_MISMATCH
    )


def _admin_ids() -> frozenset[int]:
    """The lab's admins (superusers hold every role), for a local host that is theirs alone."""
    users = get_user_model().objects.filter(is_active=True)
    return frozenset(
        users.filter(Q(is_superuser=True) | Q(groups__name=roles.ADMIN)).values_list(
            "id", flat=True
        )
    )


# What a pass reads, compiled once per process (labsite.compiled): a quick pass is three small
# reads, and through the ORM each cost more in Python than in the database.
_HOSTS = Compiled(
    lambda: enabled_hosts().values_list(
        "id", "name", "gpu_source", "cpu_slots", "cpu_count", "memory_mb"
    ),
    arity=0,
)
_SLURM_HOSTS = Compiled(
    lambda: (
        Host.objects.filter(enabled=True, kind=HostKind.SLURM)
        .exclude(state=HostState.KEY_MISMATCH)
        .values_list("id", "name")
    ),
    arity=0,
)
_CPUS_USED = Compiled(
    lambda: (
        Run.objects.filter(status__in=list(ACTIVE), host_id__isnull=False)
        .order_by()
        .values("host_id")
        .annotate(cpus=Sum("cpus"), memory=Sum("memory_mb"))
        .values_list("host_id", "cpus", "memory")
    ),
    arity=0,
)
_GPU_SIZES = Compiled(
    lambda: Gpu.objects.filter(host__in=enabled_hosts(), present=True).values_list(
        "host_id", "host__name", "memory_total_mb"
    ),
    arity=0,
)
_GPUS = Compiled(
    lambda: (
        Gpu.objects.filter(host__in=enabled_hosts(), present=True)
        .annotate(
            leased=Exists(GpuLease.objects.filter(gpu=OuterRef("pk"), released_at__isnull=True))
        )
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
    ),
    arity=0,
)


@dataclass(frozen=True, slots=True)
class HostRef:
    """What a pass needs of a host it places on (a Host row has these too)."""

    id: int
    name: str
    has_gpus: bool = True  # it reports GPUs (gpu_source is not `none`)
    cpu_slots: int | None = None  # CPUs its runs may take in all (None: not known yet)
    memory_mb: int | None = None  # the memory its runs may ask in all (None: not known yet)


@dataclass(frozen=True, slots=True)
class FreeGpu:
    """A GPU that is free by its host's policy and leased to nobody."""

    id: int
    index: int
    memory_free_mb: int
    host: HostRef


@dataclass
class Capacity:
    """The pass's view of the lab, read as the walk first needs each part and then kept in
    memory, updated as runs are placed: a pass that meets only CPU runs never reads a GPU."""

    per_user: bool = False  # whether the lab caps GPUs per user (only then is user_gpus read)
    # Set where the local host takes admins' runs only (localuser.local_refusal): who they
    # are, and why.
    local_admins: frozenset[int] | None = None
    local_refusal: str | None = None

    @classmethod
    def load(cls, *, per_user: bool) -> Capacity:
        refusal = localuser.local_refusal()
        admins = None if refusal is None else _admin_ids()
        return cls(per_user=per_user, local_admins=admins, local_refusal=refusal)

    def admins_only(self) -> str:
        """Why a member's run may not go to the local host."""
        return localuser.admins_only_reason(self.local_refusal)

    @cached_property
    def free(self) -> dict[int, list[FreeGpu]]:
        """Host id -> its free GPUs by index: one query for the GPUs, with their host's policy
        and whether a lease holds them.

        Plain rows, not models: a GPU pass reads every GPU of the lab (with 64 GPUs, model
        instances cost 8 ms of CPU per pass, rows 4 ms)."""
        rows = _GPUS.rows()
        free: dict[int, list[FreeGpu]] = defaultdict(list)
        hosts: dict[int, tuple[HostRef, GpuPolicy]] = {}
        for gpu_id, index, total, used, util, procs, leased, host_id, name, mem, pct in rows:
            if host_id not in hosts:
                hosts[host_id] = (HostRef(host_id, name), gpu_policy(mem, pct))
            host, policy = hosts[host_id]
            foreign = any(not p.get("run_id") for p in procs)
            if (
                not leased
                and not foreign
                and used <= policy.max_memory_used_mb
                and util <= policy.max_utilization_pct
            ):
                free[host_id].append(FreeGpu(gpu_id, index, max(0, total - used), host))
        return free

    @cached_property
    def user_gpus(self) -> dict[int, int]:
        """User id -> GPUs leased to the user's active runs (read where the lab caps them)."""
        used: dict[int, int] = defaultdict(int)
        if self.per_user:
            for user_id, n in Run.objects.filter(status__in=list(ACTIVE)).values_list(
                "created_by_id", "gpus"
            ):
                used[user_id] += n
        return used

    def may_use_local(self, user_id: int | None) -> bool:
        """Whether this user's runs may go to the local host."""
        return self.local_admins is None or user_id in self.local_admins

    def may_use(self, host: HostRef, user_id: int | None) -> bool:
        """Whether the run's owner may run on this host (the local host may be admins' only)."""
        return host.name != LOCAL_HOST_NAME or self.may_use_local(user_id)

    @cached_property
    def hosts(self) -> dict[int, HostRef]:
        """Every host that may get work, as plain rows, with its CPU slots and memory; read
        when the pass first needs a host (a CPU run, a GPU pick's CPU check, a reason)."""
        rows = _HOSTS.rows()
        return {
            host_id: HostRef(
                host_id,
                name,
                source != GpuSource.NONE,
                cpu_slots=slots if slots is not None else count,
                memory_mb=memory,
            )
            for host_id, name, source, slots, count, memory in rows
        }

    @cached_property
    def slurm_hosts(self) -> dict[int, HostRef]:
        """The enabled Slurm clusters: a run pinned to one is handed to Slurm at once (Slurm
        queues, places and pins it); read when the pass first meets a pinned run."""
        return {host_id: HostRef(host_id, name) for host_id, name in _SLURM_HOSTS.rows()}

    def slurm_host(self, run: Ask) -> HostRef | None:
        """The Slurm cluster the run is pinned to, if it is."""
        return None if run.host_id is None else self.slurm_hosts.get(run.host_id)

    @cached_property
    def cpu_room(self) -> dict[int, tuple[int | None, int | None]]:
        """Host id -> (CPU slots free, memory MB free): the host's less what its active runs
        take (GPU runs too), None where the host's size is not known yet. One query."""
        used = dict.fromkeys(self.hosts, (0, 0))
        for host_id, cpus, memory in _CPUS_USED.rows():
            if host_id in used:  # hosts disabled since keep their runs until they end
                used[host_id] = (cpus or 0, memory or 0)
        room: dict[int, tuple[int | None, int | None]] = {}
        for host_id, host in self.hosts.items():
            cpus, memory = used[host_id]
            room[host_id] = (
                None if host.cpu_slots is None else host.cpu_slots - cpus,
                None if host.memory_mb is None else host.memory_mb - memory,
            )
        return room

    def fits_cpu(self, host_id: int, run: Ask) -> bool:
        """Whether the host has the CPU slots (and memory) the run asks, now."""
        cpus, memory = self.cpu_room.get(host_id, (None, None))
        return (cpus is None or cpus >= run.cpus) and (
            memory is None or not run.memory_mb or memory >= run.memory_mb
        )

    def take_cpu(self, host_id: int, run: Ask) -> None:
        """The run's CPUs (and memory) are taken on this host."""
        cpus, memory = self.cpu_room.get(host_id, (None, None))
        self.cpu_room[host_id] = (
            None if cpus is None else cpus - run.cpus,
            None if memory is None else memory - (run.memory_mb or 0),
        )

    def cpu_full(self) -> bool:
        """No host has a CPU slot left (a quick pass then stops walking the CPU runs)."""
        return bool(self.cpu_room) and all(
            cpus is not None and cpus <= 0 for cpus, _ in self.cpu_room.values()
        )

    def describe_cpu(self, run: Ask, hosts: list[HostRef]) -> str:
        """Why a run does not fit now for want of CPUs or memory: "needs 2 CPU(s); 0 of 2 CPU
        slots free on local, 1 of 8 on node-a"."""
        parts = []
        for h in hosts:
            cpus, memory = self.cpu_room.get(h.id, (None, None))
            part = f"{max(cpus or 0, 0)} of {h.cpu_slots} CPU slots free on {h.name}"
            if run.memory_mb and memory is not None:
                part += f" ({max(memory, 0)} MB free)"
            parts.append(part)
        return f"{needs_cpu(run.cpus, run.memory_mb)}; {', '.join(parts)}"

    def cpu_hosts(self, user_id: int | None) -> list[HostRef]:
        """The hosts a CPU run without a host may go to, in the order tried: the local host
        first, then by name."""
        usable = [h for h in self.hosts.values() if self.may_use(h, user_id)]
        return sorted(usable, key=lambda h: (h.name != LOCAL_HOST_NAME, h.name))

    def free_total(self) -> int:
        """How many GPUs are free in the whole lab, as the pass sees it now."""
        return sum(len(gpus) for gpus in self.free.values())

    def take(self, host: HostRef, gpus: list[FreeGpu], user_id: int | None) -> None:
        """These GPUs are no longer free (placed here, or taken by another pass meanwhile)."""
        taken = {g.id for g in gpus}
        self.free[host.id] = [g for g in self.free[host.id] if g.id not in taken]
        if user_id is not None:
            self.user_gpus[user_id] += len(gpus)

    def describe(self, run: Ask, need_mb: int) -> str:
        """Why the run does not fit now: "needs 2 GPU(s); 1 free on node-a, 0 free on node-b"."""
        hosts = [self.hosts[run.host_id]] if run.host_id in self.hosts else self.gpu_hosts()
        counts = ", ".join(
            f"{sum(g.memory_free_mb >= need_mb for g in self.free.get(h.id, []))} free on {h.name}"
            + ("" if self.fits_cpu(h.id, run) else f" ({self.describe_cpu(run, [h])})")
            if self.may_use(h, run.created_by_id)
            else f"{h.name} takes admins' runs only"
            for h in hosts
        )
        return f"{needs(run.gpus, run.min_free_mem_mb)}; {counts or NO_GPU_HOST}"

    def gpu_hosts(self) -> list[HostRef]:
        """The enabled hosts that report GPUs, by name."""
        return sorted((h for h in self.hosts.values() if h.has_gpus), key=lambda h: h.name)

    def pick(self, run: Ask, need_mb: int) -> tuple[HostRef, list[FreeGpu]] | None:
        """GPUs of one host for the run: the host that fits it most tightly (keeps big holes)."""
        best: tuple[int, str, HostRef, list[FreeGpu]] | None = None
        for host_id, gpus in self.free.items():
            if not gpus or (run.host_id and host_id != run.host_id):
                continue
            host = gpus[0].host
            if not self.may_use(host, run.created_by_id) or not self.fits_cpu(host_id, run):
                continue
            fitting = [g for g in gpus if g.memory_free_mb >= need_mb]
            if len(fitting) >= run.gpus and (best is None or (len(fitting), host.name) < best[:2]):
                best = (len(fitting), host.name, host, fitting[: run.gpus])
        return (best[2], best[3]) if best else None


def _too_small(
    sizes: dict[str, tuple[int | None, int | None]],
    cpus: int,
    memory_mb: int | None,
    host: Host | None,
) -> str | None:
    """Why no host of these (name -> CPU slots, memory MB; None: not known yet) could ever
    take a CPU run of this size, or None if one could."""
    for slots, memory in sizes.values():
        if (slots is None or slots >= cpus) and (memory is None or (memory_mb or 0) <= memory):
            return None
    where = host.name if host is not None else "the largest host"
    most_cpus = max((s for s, _ in sizes.values() if s is not None), default=0)
    if all(s is not None and s < cpus for s, _ in sizes.values()):
        return f"{needs_cpu(cpus, memory_mb)}; {where} has {most_cpus} CPU slot(s)"
    most_mb = max((m for _, m in sizes.values() if m is not None), default=0)
    return f"{needs_cpu(cpus, memory_mb)}; {where} has {most_mb} MB"


def never_fits(
    *,
    gpus: int,
    min_free_mem_mb: int | None,
    host: Host | None,
    may_use_local: bool,
    cpus: int = 1,
    memory_mb: int | None = None,
) -> str | None:
    """Why no enabled host could ever take a run that asks this, or None if one could in time.

    One query, for a single run as for a grid's runs (they ask alike). Counted against what the
    hosts have, not what is free: busy GPUs free up, so only a host that is too small, or no
    host at all, makes a run wait for ever (until an admin adds or enables one). The run is
    still queued: hosts may come later.
    """
    if not gpus:
        machines = {
            name: (slots if slots is not None else count, memory)
            for host_id, name, _, slots, count, memory in _HOSTS.rows()
            if host is None or host_id == host.pk
        }
        if not machines:
            return HOST_GONE if host is not None else NO_HOST
        if not may_use_local and list(machines) == [LOCAL_HOST_NAME]:
            return localuser.admins_only_reason()
        if not may_use_local:
            machines.pop(LOCAL_HOST_NAME, None)
        return _too_small(machines, cpus, memory_mb, host)
    want = need_mb(min_free_mem_mb)
    # A GPU run counts its CPUs (and memory) against its host's too: a host with the GPUs but
    # too few CPU slots can never take it either.
    room = {
        host_id: (slots if slots is not None else count, memory)
        for host_id, _, _, slots, count, memory in _HOSTS.rows()
    }
    sizes: dict[str, int] = defaultdict(int)  # host name -> its GPUs large enough for the run
    roomy: dict[str, int] = defaultdict(int)  # the same, on hosts with room for its CPUs
    for host_id, name, total in _GPU_SIZES.rows():
        if host is None or host_id == host.pk:
            sizes[name] += total >= want
            slots, memory = room.get(host_id, (None, None))
            if (slots is None or slots >= cpus) and (memory is None or (memory_mb or 0) <= memory):
                roomy[name] += total >= want
    if not may_use_local and LOCAL_HOST_NAME in sizes:
        del sizes[LOCAL_HOST_NAME]
        roomy.pop(LOCAL_HOST_NAME, None)
        if not sizes:
            return f"{needs(gpus, min_free_mem_mb)}; {LOCAL_HOST_NAME} takes admins' runs only"
    if not sizes:
        return f"{needs(gpus, min_free_mem_mb)}; {HOST_GONE if host else NO_GPU_HOST}"
    most = max(sizes.values())
    where = host.name if host is not None else "the largest host"
    if most >= gpus:
        if max(roomy.values(), default=0) >= gpus:
            return None
        return (
            f"{needs(gpus, min_free_mem_mb)} and {needs_cpu(cpus, memory_mb)[6:]}; "
            f"no host with {gpus} such GPU(s) has that many CPU slots"
            + (" and that much memory" if memory_mb else "")
        )
    large = f" of {want} MB or more" if want else ""
    return f"{needs(gpus, min_free_mem_mb)}; {where} has {most}{large}"
