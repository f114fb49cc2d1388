"""Host shapes: the private key goes in once and never comes out."""

from __future__ import annotations

from rest_framework import serializers

from clusters.choices import HostKind
from clusters.models import Host


class HostSerializer(serializers.ModelSerializer):
    gpu_count = serializers.SerializerMethodField()
    has_identity = serializers.SerializerMethodField()

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
            "gpu_source",
            "gpu_count",
            "gpu_free_max_mem_mb",
            "gpu_free_max_util_pct",
            "has_identity",
            "created_at",
        ]
        read_only_fields = fields

    def get_gpu_count(self, host: Host) -> int:
        return sum(1 for g in host.gpus.all() if g.present)

    def get_has_identity(self, host: Host) -> bool:
        return bool(host.identity_file)


class HostWriteSerializer(serializers.ModelSerializer):
    private_key = serializers.CharField(required=False, write_only=True, trim_whitespace=False)
    kind = serializers.ChoiceField(choices=[HostKind.SSH, HostKind.LOCAL], default=HostKind.SSH)

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
        ]
        extra_kwargs = {"identity_file": {"write_only": True}}

    def validate(self, attrs: dict) -> dict:
        kind = attrs.get("kind", getattr(self.instance, "kind", HostKind.SSH))
        if kind == HostKind.SSH and not (
            attrs.get("hostname") or getattr(self.instance, "hostname", "")
        ):
            raise serializers.ValidationError({"hostname": "an ssh host needs a hostname"})
        fp = attrs.get("host_key_fingerprint", "")
        if fp and not fp.startswith("SHA256:"):
            raise serializers.ValidationError(
                {"host_key_fingerprint": "give it as ssh-keygen -lf prints it: SHA256:..."}
            )
        if attrs.get("identity_file") and attrs.get("private_key"):
            raise serializers.ValidationError(
                {"private_key": "give identity_file or private_key, not both"}
            )
        return attrs


class AcceptKeySerializer(serializers.Serializer):
    fingerprint = serializers.CharField()
