"""Status sets of the machines."""

from django.db import models


class HostKind(models.TextChoices):
    SSH = "ssh", "SSH"
    LOCAL = "local", "Local"
    SLURM = "slurm", "Slurm"


class HostState(models.TextChoices):
    UNKNOWN = "unknown", "Unknown"
    ONLINE = "online", "Online"
    OFFLINE = "offline", "Offline"
    KEY_MISMATCH = "key_mismatch", "Host key mismatch"


class GpuSource(models.TextChoices):
    NONE = "none", "No GPU"
    NVML = "nvml", "NVML"
    NVIDIA_SMI = "nvidia-smi", "nvidia-smi"
    SLURM = "slurm", "Slurm gres"
