from django.contrib import admin

from experiments.models import (
    AgentCursor,
    Alert,
    GpuLease,
    Plan,
    PlanEvent,
    PromptSkill,
    Run,
    RunEvent,
    Sweep,
)


class RunEventInline(admin.TabularInline):
    model = RunEvent
    extra = 0
    can_delete = False
    readonly_fields = [
        "from_status",
        "to_status",
        "reason",
        "message",
        "actor_kind",
        "actor_user",
        "actor_token",
        "created_at",
    ]

    def has_add_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    """Status is read-only here: it changes only through the run services."""

    list_display = ["id", "name", "status", "reason", "host", "gpus", "created_by", "created_at"]
    list_filter = ["status", "host"]
    search_fields = ["id", "name", "command", "chat_session_id"]
    readonly_fields = [
        "status",
        "reason",
        "exit_code",
        "pid",
        "slurm_job_id",
        "created_at",
        "held_at",
        "queued_at",
        "launched_at",
        "started_at",
        "ended_at",
        "stop_requested_at",
        "updated_at",
    ]
    raw_id_fields = ["sweep", "plan", "parent", "created_by"]
    inlines = [RunEventInline]


@admin.register(RunEvent)
class RunEventAdmin(admin.ModelAdmin):
    list_display = [
        "run",
        "from_status",
        "to_status",
        "reason",
        "actor_kind",
        "actor_user",
        "created_at",
    ]
    list_filter = ["to_status", "actor_kind"]
    raw_id_fields = ["run"]

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False


class PlanEventInline(admin.TabularInline):
    model = PlanEvent
    extra = 0
    can_delete = False
    readonly_fields = [
        "from_status",
        "to_status",
        "comment",
        "actor_kind",
        "actor_user",
        "created_at",
    ]


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ["id", "title", "status", "author", "reviewer", "gpu_hours_budget", "created_at"]
    list_filter = ["status"]
    search_fields = ["id", "title", "goal"]
    readonly_fields = ["status", "reviewer", "decided_at", "submitted_at", "sections"]
    inlines = [PlanEventInline]


@admin.register(PlanEvent)
class PlanEventAdmin(admin.ModelAdmin):
    list_display = ["plan", "from_status", "to_status", "actor_user", "created_at"]


@admin.register(Sweep)
class SweepAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "kind", "plan", "created_by", "created_at"]
    list_filter = ["kind"]
    search_fields = ["id", "name", "goal"]


@admin.register(GpuLease)
class GpuLeaseAdmin(admin.ModelAdmin):
    list_display = ["gpu", "run", "created_at", "released_at"]
    raw_id_fields = ["run"]


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ["id", "severity", "message", "run", "status", "response", "created_at"]
    list_filter = ["status", "severity"]
    raw_id_fields = ["run"]


@admin.register(AgentCursor)
class AgentCursorAdmin(admin.ModelAdmin):
    list_display = ["user", "session_id", "last_run_event_id", "last_alert_id", "updated_at"]


@admin.register(PromptSkill)
class PromptSkillAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "category", "updated_by", "updated_at"]
