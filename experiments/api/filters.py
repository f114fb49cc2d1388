"""One FilterSet per list, shared by the API and the pages.

A filter value that cannot match (an unknown status, text with NUL) is a 400 naming the
parameter, on the API and on the pages alike, never an empty list or a database error.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from rest_framework.exceptions import ValidationError

from experiments.choices import AlertStatus, PlanStatus, RunStatus, SweepKind
from experiments.models import Alert, Plan, Run, Sweep

# Ids, names and session ids are all at most 200 characters in their columns.
MAX_FILTER_LENGTH = 200


class TextFilter(django_filters.CharFilter):
    """Exact text; Django's CharField already refuses NUL, this bounds the length too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", MAX_FILTER_LENGTH)
        super().__init__(*args, **kwargs)


class CsvChoiceFilter(django_filters.BaseInFilter, django_filters.CharFilter):
    """`status=queued,running` as well as `status=queued`; each value one of `choices`."""

    def __init__(self, *args: Any, choices: list[str], **kwargs: Any) -> None:
        kwargs.setdefault("max_length", MAX_FILTER_LENGTH)
        super().__init__(*args, **kwargs)
        self.valid_values = list(choices)


class StrictFilterSet(django_filters.FilterSet):
    def filter_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        # The DRF backend stops an invalid form itself; the pages read `.qs`, which would
        # silently drop the invalid filter and list everything.
        if self.form.errors:
            raise ValidationError(
                {
                    name: [str(message) for message in errors]
                    for name, errors in self.form.errors.items()
                }
            )
        for name, filter_ in self.filters.items():
            valid = getattr(filter_, "valid_values", None)
            bad = [v for v in self.form.cleaned_data.get(name) or [] if valid and v not in valid]
            if bad:
                raise ValidationError(
                    {name: f"unknown {name} {', '.join(bad)}; use {', '.join(valid or [])}"}
                )
        return super().filter_queryset(queryset)


class RunFilter(StrictFilterSet):
    status = CsvChoiceFilter(field_name="status", choices=RunStatus.values)
    sweep_id = TextFilter(field_name="sweep_id")
    plan_id = TextFilter(field_name="plan_id")
    chat_session_id = TextFilter(field_name="chat_session_id")
    host = TextFilter(field_name="host__name")
    created_by = TextFilter(field_name="created_by__username")

    class Meta:
        model = Run
        fields = ["status", "sweep_id", "plan_id", "chat_session_id", "host", "created_by"]


class SweepFilter(StrictFilterSet):
    chat_session_id = TextFilter(field_name="chat_session_id")
    plan_id = TextFilter(field_name="plan_id")
    kind = CsvChoiceFilter(field_name="kind", choices=SweepKind.values)

    class Meta:
        model = Sweep
        fields = ["chat_session_id", "plan_id", "kind"]


class PlanFilter(StrictFilterSet):
    status = CsvChoiceFilter(field_name="status", choices=PlanStatus.values)
    session_id = TextFilter(field_name="session_id")
    author = TextFilter(field_name="author__username")

    class Meta:
        model = Plan
        fields = ["status", "session_id", "author"]


class AlertFilter(StrictFilterSet):
    status = CsvChoiceFilter(field_name="status", choices=AlertStatus.values)
    run_id = TextFilter(field_name="run_id")

    class Meta:
        model = Alert
        fields = ["status", "run_id"]
