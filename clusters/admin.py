from django.contrib import admin

from clusters.models import Gpu, Host


class GpuInline(admin.TabularInline):
    model = Gpu
    extra = 0
    readonly_fields = [
        "uuid",
        "index",
        "name",
        "memory_total_mb",
        "memory_used_mb",
        "utilization_pct",
        "processes",
        "present",
        "updated_at",
    ]
    can_delete = False


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "hostname", "enabled", "state", "gpu_source", "last_seen_at"]
    list_filter = ["kind", "enabled", "state"]
    search_fields = ["name", "hostname"]
    readonly_fields = [
        "state",
        "state_note",
        "gpu_source",
        "facts",
        "last_seen_at",
        "inventory_at",
        "host_key_fingerprint",
        "created_at",
    ]
    inlines = [GpuInline]


@admin.register(Gpu)
class GpuAdmin(admin.ModelAdmin):
    list_display = [
        "host",
        "index",
        "name",
        "uuid",
        "memory_used_mb",
        "memory_total_mb",
        "utilization_pct",
        "present",
        "updated_at",
    ]
    list_filter = ["host", "present"]
    search_fields = ["uuid", "name"]
