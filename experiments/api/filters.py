"""One FilterSet per list, shared by the API and the pages."""

from __future__ import annotations

import django_filters

from experiments.choices import RunStatus
from experiments.models import Alert, Plan, Run, Sweep


class CsvStatusFilter(django_filters.BaseInFilter, django_filters.CharFilter):
    """`status=queued,running` as well as `status=queued`."""


class RunFilter(django_filters.FilterSet):
    status = CsvStatusFilter(field_name="status")
    sweep_id = django_filters.CharFilter(field_name="sweep_id")
    plan_id = django_filters.CharFilter(field_name="plan_id")
    chat_session_id = django_filters.CharFilter(field_name="chat_session_id")
    host = django_filters.CharFilter(field_name="host__name")
    created_by = django_filters.CharFilter(field_name="created_by__username")

    class Meta:
        model = Run
        fields = ["status", "sweep_id", "plan_id", "chat_session_id", "host", "created_by"]

    def filter_queryset(self, queryset):  # type: ignore[no-untyped-def]
        bad = [s for s in self.form.cleaned_data.get("status") or [] if s not in RunStatus.values]
        if bad:
            from rest_framework.exceptions import ValidationError

            raise ValidationError(
                {"status": f"unknown status {', '.join(bad)}; use {', '.join(RunStatus.values)}"}
            )
        return super().filter_queryset(queryset)


class SweepFilter(django_filters.FilterSet):
    chat_session_id = django_filters.CharFilter(field_name="chat_session_id")
    plan_id = django_filters.CharFilter(field_name="plan_id")
    kind = django_filters.CharFilter(field_name="kind")

    class Meta:
        model = Sweep
        fields = ["chat_session_id", "plan_id", "kind"]


class PlanFilter(django_filters.FilterSet):
    status = CsvStatusFilter(field_name="status")
    session_id = django_filters.CharFilter(field_name="session_id")
    author = django_filters.CharFilter(field_name="author__username")

    class Meta:
        model = Plan
        fields = ["status", "session_id", "author"]


class AlertFilter(django_filters.FilterSet):
    status = django_filters.CharFilter(field_name="status")
    run_id = django_filters.CharFilter(field_name="run_id")

    class Meta:
        model = Alert
        fields = ["status", "run_id"]
