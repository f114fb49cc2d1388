"""API shapes: inputs are parsed here, services do the work, outputs are read-only."""

from __future__ import annotations

import re
from typing import Any

from rest_framework import serializers

from experiments import selectors
from experiments.models import Alert, Plan, PlanEvent, Run, Sweep
from labsite.validation import INT32_MAX, InputSerializer, lab_limit

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """Environment values whose names look secret are never sent back."""
    return {k: ("********" if SECRET_NAME.search(k) else v) for k, v in env.items()}


class RunSerializer(serializers.ModelSerializer):
    sweep_id = serializers.CharField(allow_null=True, read_only=True)
    plan_id = serializers.CharField(allow_null=True, read_only=True)
    parent_id = serializers.CharField(allow_null=True, read_only=True)
    host = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="created_by.username", read_only=True)
    leased_gpus = serializers.SerializerMethodField()
    env = serializers.SerializerMethodField()

    class Meta:
        model = Run
        fields = [
            "id",
            "name",
            "status",
            "reason",
            "error",
            "command",
            "workdir",
            "env",
            "params",
            "sweep_id",
            "plan_id",
            "parent_id",
            "priority",
            "gpus",
            "min_free_mem_mb",
            "cpus",
            "memory_mb",
            "gpuwrap_config",
            "host",
            "leased_gpus",
            "exit_code",
            "pid",
            "slurm_job_id",
            "slurm_state",
            "slurm",
            "waiting_reason",
            "metrics_latest",
            "log_size",
            "chat_session_id",
            "created_by",
            "stop_requested_at",
            "created_at",
            "held_at",
            "queued_at",
            "launched_at",
            "started_at",
            "ended_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_host(self, run: Run) -> str | None:
        return run.host.name if run.host is not None else None

    def get_leased_gpus(self, run: Run) -> list[dict[str, Any]]:
        leases = getattr(run, "active_leases", None)
        if leases is None:
            leases = run.leases.filter(released_at__isnull=True).select_related("gpu")
        return [{"index": lease.gpu.index, "uuid": lease.gpu.uuid} for lease in leases]

    def get_env(self, run: Run) -> dict[str, str]:
        return redact_env(run.env)


def command_summary(run: Run) -> dict[str, Any]:
    """A list row's command: its first LIST_COMMAND_CHARS characters, and whether it was cut.

    runs_summaries() reads only that head from the database (command_head, command_length);
    a run loaded whole is cut here.
    """
    most = lab_limit("LIST_COMMAND_CHARS")
    head = getattr(run, "command_head", None)
    length = getattr(run, "command_length", None)
    if head is None or length is None:
        head, length = run.command[:most], len(run.command)
    return {"command": head[:most], "command_truncated": length > most}


class RunListSerializer(RunSerializer):
    """A run as lists show it: a bounded summary of its command (GET /runs/{id} has it all)."""

    command = serializers.SerializerMethodField()
    command_truncated = serializers.SerializerMethodField()

    class Meta(RunSerializer.Meta):
        fields = [*RunSerializer.Meta.fields, "command_truncated"]
        read_only_fields = fields

    def get_command(self, run: Run) -> str:
        return str(command_summary(run)["command"])

    def get_command_truncated(self, run: Run) -> bool:
        return bool(command_summary(run)["command_truncated"])


class GpuwrapConfigField(serializers.JSONField):
    """An object checked by the service (unknown keys are an error)."""


class RunCreateSerializer(InputSerializer):
    # Lengths of names and commands are the lab's limits, checked by the service.
    name = serializers.CharField(required=False, allow_blank=True)
    command = serializers.CharField(trim_whitespace=True)
    sweep_id = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    plan_id = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    chat_session_id = serializers.CharField(
        required=False, allow_null=True, allow_blank=True, max_length=200
    )
    auto_start = serializers.BooleanField(required=False, default=False)
    gpuwrap_config = GpuwrapConfigField(required=False, allow_null=True)
    workdir = serializers.CharField(required=False, allow_blank=True, max_length=1000)
    env = serializers.JSONField(required=False, allow_null=True)
    params = serializers.DictField(required=False)
    gpus = serializers.IntegerField(required=False, allow_null=True, min_value=0, max_value=64)
    min_free_mem_mb = serializers.IntegerField(
        required=False, allow_null=True, min_value=0, max_value=INT32_MAX
    )
    cpus = serializers.IntegerField(required=False, default=1, min_value=1, max_value=4096)
    memory_mb = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=INT32_MAX
    )
    host = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    priority = serializers.IntegerField(required=False, default=0, min_value=-1000, max_value=1000)
    slurm = serializers.JSONField(
        required=False,
        allow_null=True,
        help_text="on a Slurm host: sbatch options over the host's (partition, account, qos, "
        "time, cpus_per_gpu or cpus_per_task, mem or mem_per_gpu, constraint, exclude)",
    )


class SweepSerializer(serializers.ModelSerializer):
    plan_id = serializers.CharField(allow_null=True, read_only=True)
    created_by = serializers.CharField(source="created_by.username", read_only=True)
    status = serializers.SerializerMethodField()
    progress = serializers.SerializerMethodField()

    class Meta:
        model = Sweep
        fields = [
            "id",
            "name",
            "goal",
            "kind",
            "plan_id",
            "base_command",
            "parameters",
            "max_runs",
            "slurm_array_throttle",
            "chat_session_id",
            "created_by",
            "created_at",
            "status",
            "progress",
        ]
        read_only_fields = fields

    def _counts(self, sweep: Sweep) -> dict[str, int]:
        cached: dict[str, int] | None = getattr(sweep, "_run_counts", None)
        if cached is None:
            cached = selectors.sweep_counts(sweep)
            sweep._run_counts = cached  # type: ignore[attr-defined]
        return cached

    def get_status(self, sweep: Sweep) -> str:
        return selectors.sweep_status(self._counts(sweep))

    def get_progress(self, sweep: Sweep) -> dict[str, Any]:
        counts = self._counts(sweep)
        total = sum(counts.values())
        done = counts["finished"] + counts["failed"] + counts["stopped"]
        return {"total": total, "done": done, "by_status": counts}


class SweepRunSerializer(serializers.ModelSerializer):
    """A sweep's run row: like list rows, a bounded summary of the command."""

    command = serializers.SerializerMethodField()
    command_truncated = serializers.SerializerMethodField()

    class Meta:
        model = Run
        fields = ["id", "name", "status", "command", "command_truncated", "params"]
        read_only_fields = fields

    def get_command(self, run: Run) -> str:
        return str(command_summary(run)["command"])

    def get_command_truncated(self, run: Run) -> bool:
        return bool(command_summary(run)["command_truncated"])


class SweepDetailSerializer(SweepSerializer):
    runs = serializers.SerializerMethodField()

    def get_runs(self, sweep: Sweep) -> list[dict[str, Any]]:
        runs = selectors.run_summaries(sweep.runs.all()).order_by("created_at", "id")
        return SweepRunSerializer(runs, many=True).data  # type: ignore[return-value]

    class Meta(SweepSerializer.Meta):
        fields = [*SweepSerializer.Meta.fields, "runs"]
        read_only_fields = fields


class RunOptionsMixin(InputSerializer):
    gpuwrap_config = GpuwrapConfigField(required=False, allow_null=True)
    gpus = serializers.IntegerField(required=False, allow_null=True, min_value=0, max_value=64)
    min_free_mem_mb = serializers.IntegerField(
        required=False, allow_null=True, min_value=0, max_value=INT32_MAX
    )
    cpus = serializers.IntegerField(required=False, default=1, min_value=1, max_value=4096)
    memory_mb = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=INT32_MAX
    )
    host = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    workdir = serializers.CharField(required=False, allow_blank=True, max_length=1000)
    env = serializers.JSONField(required=False, allow_null=True)
    priority = serializers.IntegerField(required=False, default=0, min_value=-1000, max_value=1000)
    slurm = serializers.JSONField(
        required=False, allow_null=True, help_text="on a Slurm host: sbatch options (see runs)"
    )


class SweepCreateSerializer(RunOptionsMixin):
    name = serializers.CharField()
    base_command = serializers.CharField()
    parameters = serializers.JSONField()
    max_runs = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=INT32_MAX
    )
    goal = serializers.CharField(required=False, allow_blank=True)
    auto_start = serializers.BooleanField(required=False, default=False)
    slurm_array_throttle = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=10000,
        help_text="on a Slurm host: submit the runs as one job array, this many at once",
    )
    chat_session_id = serializers.CharField(
        required=False, allow_null=True, allow_blank=True, max_length=200
    )
    plan_id = serializers.CharField(required=False, allow_null=True, allow_blank=True)


class WildSweepCreateSerializer(InputSerializer):
    name = serializers.CharField()
    goal = serializers.CharField(required=False, allow_blank=True)
    chat_session_id = serializers.CharField(
        required=False, allow_null=True, allow_blank=True, max_length=200
    )
    plan_id = serializers.CharField(required=False, allow_null=True, allow_blank=True)


class PlanEventSerializer(serializers.ModelSerializer):
    actor = serializers.SerializerMethodField()

    class Meta:
        model = PlanEvent
        fields = ["from_status", "to_status", "comment", "actor", "actor_kind", "created_at"]
        read_only_fields = fields

    def get_actor(self, event: PlanEvent) -> str | None:
        return event.actor_user.username if event.actor_user is not None else None


class PlanSerializer(serializers.ModelSerializer):
    author = serializers.CharField(source="author.username", read_only=True)
    reviewer = serializers.SerializerMethodField()

    class Meta:
        model = Plan
        fields = [
            "id",
            "title",
            "goal",
            "status",
            "raw_markdown",
            "sections",
            "session_id",
            "author",
            "reviewer",
            "review_comment",
            "decided_at",
            "gpu_hours_budget",
            "self_approved",
            "submitted_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_reviewer(self, plan: Plan) -> str | None:
        return plan.reviewer.username if plan.reviewer is not None else None


class PlanListSerializer(PlanSerializer):
    """A plan as lists show it: the head of its markdown and of each section, and whether the
    markdown was cut (LABSITE_LIST_COMMAND_CHARS characters, as for commands); GET
    /plans/{id} has them whole."""

    raw_markdown_truncated = serializers.SerializerMethodField()

    class Meta(PlanSerializer.Meta):
        fields = [*PlanSerializer.Meta.fields, "raw_markdown_truncated"]
        read_only_fields = fields

    def to_representation(self, plan: Plan) -> dict[str, Any]:
        data: dict[str, Any] = super().to_representation(plan)
        most = lab_limit("LIST_COMMAND_CHARS")
        data["raw_markdown"] = data["raw_markdown"][:most]
        data["sections"] = {k: str(v)[:most] for k, v in (data["sections"] or {}).items()}
        return data

    def get_raw_markdown_truncated(self, plan: Plan) -> bool:
        return len(plan.raw_markdown) > lab_limit("LIST_COMMAND_CHARS")


class PlanDetailSerializer(PlanSerializer):
    events = PlanEventSerializer(many=True, read_only=True)

    class Meta(PlanSerializer.Meta):
        fields = [*PlanSerializer.Meta.fields, "events"]
        read_only_fields = fields


class PlanCreateSerializer(InputSerializer):
    title = serializers.CharField(max_length=300)
    goal = serializers.CharField(required=False, allow_blank=True)
    session_id = serializers.CharField(
        required=False, allow_null=True, allow_blank=True, max_length=200
    )
    raw_markdown = serializers.CharField(required=False, allow_blank=True)


class PlanUpdateSerializer(InputSerializer):
    title = serializers.CharField(max_length=300, required=False)
    goal = serializers.CharField(required=False, allow_blank=True)
    raw_markdown = serializers.CharField(required=False, allow_blank=True)


class PlanDecisionSerializer(InputSerializer):
    comment = serializers.CharField(required=False, allow_blank=True, default="")


class PlanApproveSerializer(PlanDecisionSerializer):
    gpu_hours_budget = serializers.FloatField(required=False, allow_null=True, min_value=0)


class AlertSerializer(serializers.ModelSerializer):
    run_id = serializers.CharField(allow_null=True, read_only=True)
    responded_by = serializers.SerializerMethodField()

    class Meta:
        model = Alert
        fields = [
            "id",
            "run_id",
            "severity",
            "message",
            "choices",
            "status",
            "response",
            "responded_by",
            "responded_at",
            "created_at",
        ]
        read_only_fields = fields

    def get_responded_by(self, alert: Alert) -> str | None:
        return alert.responded_by.username if alert.responded_by is not None else None


class AlertRespondSerializer(InputSerializer):
    choice = serializers.CharField(max_length=100)


class PromptSkillSummarySerializer(serializers.Serializer):
    id = serializers.CharField()
    name = serializers.CharField()
    description = serializers.CharField()
    category = serializers.CharField()
    variables = serializers.ListField(child=serializers.CharField())
    source = serializers.CharField()  # type: ignore[assignment]


class PromptSkillSerializer(PromptSkillSummarySerializer):
    template = serializers.CharField()


class PromptSkillUpdateSerializer(InputSerializer):
    name = serializers.CharField(max_length=200, required=False)
    description = serializers.CharField(required=False, allow_blank=True)
    category = serializers.CharField(max_length=100, required=False, allow_blank=True)
    variables = serializers.ListField(child=serializers.CharField(), required=False)
    template = serializers.CharField(required=False)


class RenderSerializer(InputSerializer):
    variables = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
