"""Host shapes: the private key goes in once and never comes out."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from clusters import localuser, slurm, slurm_pacing
from clusters.choices import HostKind
from clusters.models import Host
from labsite import roles
from labsite.validation import INT32_MAX, InputSerializer, ModelInputSerializer


class HostSerializer(serializers.ModelSerializer[Host]):
    gpu_count = serializers.SerializerMethodField()
    has_identity = serializers.SerializerMethodField()
    members_refused = serializers.SerializerMethodField(
        help_text="the local host only: why members' runs may not go there (null: they may)"
    )
    slurm_calls_per_minute = serializers.SerializerMethodField(
        help_text="a Slurm host only: the Slurm commands made for it in the last 60 s"
    )
    slurm_poll_seconds = serializers.SerializerMethodField(
        help_text="a Slurm host only: its poll interval now (backs off while nothing changes)"
    )

    class Meta:
        model = Host
        fields = [
            "id",
            "name",
            "kind",
            "hostname",
            "port",
            "username",
            "env_setup",
            "run_root",
            "enabled",
            "host_key_fingerprint",
            "state",
            "state_note",
            "last_seen_at",
            "probed_at",
            "inventory_at",
            "gpu_source",
            "gpu_count",
            "gpu_free_max_mem_mb",
            "gpu_free_max_util_pct",
            "cpu_count",
            "cpu_slots",
            "memory_mb",
            "slurm",
            "slurm_calls_per_minute",
            "slurm_poll_seconds",
            "has_identity",
            "members_refused",
            "created_at",
        ]
        read_only_fields = fields

    def to_representation(self, instance: Host) -> dict[str, Any]:
        data: dict[str, Any] = super().to_representation(instance)
        request = self.context.get("request")
        if request is None or not roles.is_admin(request.user):
            # An admin's activation line may carry secrets (tokens, license servers).
            data["env_setup"] = None
        return data

    def get_gpu_count(self, host: Host) -> int:
        return sum(1 for g in host.gpus.all() if g.present)

    def get_members_refused(self, host: Host) -> str | None:
        if host.kind != HostKind.LOCAL:
            return None
        return localuser.local_refusal(host.facts)

    def get_slurm_calls_per_minute(self, host: Host) -> int | None:
        return slurm_pacing.calls_per_minute(host.pk) if host.kind == HostKind.SLURM else None

    def get_slurm_poll_seconds(self, host: Host) -> float | None:
        return slurm_pacing.interval(host.pk) if host.kind == HostKind.SLURM else None

    def get_has_identity(self, host: Host) -> bool:
        return bool(host.identity_file)


class ProbeRequestSerializer(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["requested"])
    requested_at = serializers.DateTimeField()
    poll = serializers.CharField(help_text="GET it until probed_at is later than requested_at")


class HostProbeSerializer(HostSerializer):
    """A host whose probe a worker was asked for: what the database knows now, and the probe."""

    probe = ProbeRequestSerializer(read_only=True)

    class Meta(HostSerializer.Meta):
        fields = [*HostSerializer.Meta.fields, "probe"]
        read_only_fields = fields


class HostWriteSerializer(ModelInputSerializer):
    private_key = serializers.CharField(required=False, write_only=True, trim_whitespace=False)
    kind = serializers.ChoiceField(
        choices=[HostKind.SSH, HostKind.LOCAL, HostKind.SLURM], default=HostKind.SSH
    )

    class Meta:
        model = Host
        fields = [
            "name",
            "kind",
            "hostname",
            "port",
            "username",
            "identity_file",
            "private_key",
            "env_setup",
            "run_root",
            "enabled",
            "host_key_fingerprint",
            "gpu_free_max_mem_mb",
            "gpu_free_max_util_pct",
            "cpu_slots",
            "slurm",
        ]
        # Explicit ranges: on SQLite the model's columns carry none, and PostgreSQL's stop at
        # 2**31 - 1 with an error rather than a message.
        extra_kwargs = {
            "identity_file": {"write_only": True},
            "port": {"min_value": 1, "max_value": 65535},
            "gpu_free_max_mem_mb": {"min_value": 0, "max_value": INT32_MAX},
            "gpu_free_max_util_pct": {"min_value": 0, "max_value": 100},
            # How many CPUs runs may take in all here (null: one per core the host has).
            "cpu_slots": {"min_value": 0, "max_value": 1_000_000},
        }

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        kind = attrs.get("kind", getattr(self.instance, "kind", HostKind.SSH))
        hostname = attrs.get("hostname", getattr(self.instance, "hostname", ""))
        if kind == HostKind.SSH and not hostname:
            raise serializers.ValidationError({"hostname": "an ssh host needs a hostname"})
        if kind == HostKind.SLURM and not hostname:
            raise serializers.ValidationError(
                {
                    "hostname": "a Slurm host needs its login node: a hostname reached over "
                    "SSH, or localhost for this machine"
                }
            )
        fp = attrs.get("host_key_fingerprint", "")
        if fp and not fp.startswith("SHA256:"):
            raise serializers.ValidationError(
                {"host_key_fingerprint": "give it as ssh-keygen -lf prints it: SHA256:..."}
            )
        if "slurm" in attrs:
            if kind != HostKind.SLURM and attrs["slurm"]:
                raise serializers.ValidationError(
                    {"slurm": "default sbatch options are for a Slurm host"}
                )
            try:
                attrs["slurm"] = slurm.check_options(attrs["slurm"])
            except ValueError as exc:
                raise serializers.ValidationError({"slurm": str(exc)}) from exc
        if attrs.get("identity_file") and attrs.get("private_key"):
            raise serializers.ValidationError(
                {"private_key": "give identity_file or private_key, not both"}
            )
        return attrs


class AcceptKeySerializer(InputSerializer):
    fingerprint = serializers.CharField(max_length=128)
