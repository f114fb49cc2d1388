"""The lab's machines and their GPUs, as last reported."""

from __future__ import annotations

from django.db import models

from clusters.choices import GpuSource, HostKind, HostState


class Host(models.Model):
    """A machine Labsite runs work on: over SSH, the server itself, or a Slurm login node."""

    name = models.SlugField(max_length=64, unique=True)
    kind = models.CharField(max_length=8, choices=HostKind.choices, default=HostKind.SSH)
    hostname = models.CharField(max_length=255, blank=True)
    port = models.PositiveIntegerField(default=22)
    username = models.CharField(max_length=64, blank=True)
    identity_file = models.CharField(max_length=500, blank=True)
    env_setup = models.CharField(max_length=500, blank=True)
    run_root = models.CharField(max_length=500, default="~/.labsite/runs")
    enabled = models.BooleanField(default=True)
    host_key_fingerprint = models.CharField(max_length=128, blank=True)
    # GPU policy overrides; null means the lab default (settings.LABSITE).
    gpu_free_max_mem_mb = models.PositiveIntegerField(null=True, blank=True)
    gpu_free_max_util_pct = models.PositiveIntegerField(null=True, blank=True)
    # CPU capacity: the core count and memory its inventory read (null until read), and an
    # admin's override of how many CPU slots runs may take (null: one per core).
    cpu_count = models.PositiveIntegerField(null=True, blank=True)
    memory_mb = models.PositiveIntegerField(null=True, blank=True)
    cpu_slots = models.PositiveIntegerField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=HostState.choices, default=HostState.UNKNOWN)
    state_note = models.CharField(max_length=500, blank=True)
    gpu_source = models.CharField(max_length=16, choices=GpuSource.choices, default=GpuSource.NONE)
    # What the last inventory learned (Slurm partitions, driver, CPU count...).
    facts = models.JSONField(default=dict, blank=True)
    # A Slurm host's default sbatch options for its runs (clusters.slurm.OPTION_KEYS).
    slurm = models.JSONField(default=dict, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    probed_at = models.DateTimeField(null=True, blank=True)
    inventory_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def cpu_slots_effective(self) -> int | None:
        """How many CPUs runs may take here: the override, else the cores read (None: unknown)."""
        return self.cpu_slots if self.cpu_slots is not None else self.cpu_count


class Gpu(models.Model):
    """One GPU, identified by UUID, with the state its host last reported."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="gpus")
    uuid = models.CharField(max_length=80, unique=True)
    index = models.PositiveIntegerField()
    name = models.CharField(max_length=120, blank=True)
    memory_total_mb = models.PositiveIntegerField(default=0)
    memory_used_mb = models.PositiveIntegerField(default=0)
    utilization_pct = models.PositiveIntegerField(default=0)
    # [{"pid": int, "used_memory_mb": int}] as the host reported them.
    processes = models.JSONField(default=list, blank=True)
    present = models.BooleanField(default=True)
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["host__name", "index"]

    def __str__(self) -> str:
        return f"{self.host.name}:{self.index} {self.name}"

    @property
    def memory_free_mb(self) -> int:
        return max(0, self.memory_total_mb - self.memory_used_mb)
