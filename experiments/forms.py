"""Page forms: they parse browser input; the services decide what is allowed."""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from clusters.models import Host
from experiments.choices import PlanStatus, RunStatus
from experiments.models import Plan, Sweep
from labsite.api import KEY_PATTERN

# Names the services use in their ValidationError dicts -> this module's field names.
SERVICE_FIELD_ALIASES = {"plan_id": "plan", "sweep_id": "sweep", "gpuwrap_config": "pin_gpus"}


def add_service_errors(form: forms.Form, exc: ValidationError) -> None:
    """Put a service's ValidationError on the form: on its field when the form has one."""
    if not hasattr(exc, "error_dict"):
        form.add_error(None, exc)
        return
    for key, errors in exc.message_dict.items():
        field = SERVICE_FIELD_ALIASES.get(key, key)
        if field in form.fields:
            form.add_error(field, errors)
        else:
            form.add_error(None, [f"{key}: {message}" for message in errors])


class KeyChoiceField(forms.ModelChoiceField):
    """A choice by id or name; a key no object could have (NUL...) is invalid without a query,
    since PostgreSQL answers NUL with an error rather than with no rows."""

    def to_python(self, value: Any) -> Any:
        if value not in self.empty_values and not KEY_PATTERN.fullmatch(str(value)):
            raise ValidationError(self.error_messages["invalid_choice"], code="invalid_choice")
        return super().to_python(value)


class PlanChoiceField(KeyChoiceField):
    def label_from_instance(self, obj: Any) -> str:
        return f"{obj.title} ({obj.get_status_display().lower()})"


class RunForm(forms.Form):
    """A single run, as /runs/new creates it."""

    name = forms.CharField(
        max_length=200, required=False, help_text="Defaults to the command's first word."
    )
    command = forms.CharField(
        widget=forms.Textarea(
            attrs={"rows": 3, "class": "mono", "placeholder": "python train.py --lr 3e-4"}
        ),
        help_text="Run in your shell on the host, as you would type it.",
    )
    workdir = forms.CharField(
        label="Working directory",
        max_length=1000,
        required=False,
        widget=forms.TextInput(attrs={"class": "mono"}),
        help_text="Directory to run in; empty means the host's home directory.",
    )
    gpus = forms.IntegerField(min_value=0, max_value=64, initial=0, label="GPUs")
    pin_gpus = forms.BooleanField(
        required=False,
        initial=True,
        label="Pick free GPUs and pin them",
        help_text="Sets CUDA_VISIBLE_DEVICES to GPUs nobody else is using (when GPUs > 0).",
    )
    host = KeyChoiceField(
        queryset=Host.objects.filter(enabled=True),
        required=False,
        to_field_name="name",
        empty_label="Any host",
        help_text="Leave on 'Any host' to let the scheduler choose.",
    )
    sweep = KeyChoiceField(
        queryset=Sweep.objects.order_by("-created_at"), required=False, empty_label="No sweep"
    )
    plan = PlanChoiceField(
        queryset=Plan.objects.exclude(
            status__in=[PlanStatus.REJECTED, PlanStatus.ARCHIVED]
        ).order_by("-created_at"),
        required=False,
        empty_label="No plan",
        help_text="A run under a plan that is not approved yet waits as 'held'.",
    )
    auto_start = forms.BooleanField(
        required=False,
        initial=True,
        label="Start now",
        help_text="Queue it at once; otherwise it stays 'ready' until you press Start.",
    )

    def service_kwargs(self) -> dict[str, Any]:
        """The form's values as run_create takes them."""
        data = self.cleaned_data
        gpus = data["gpus"] or 0
        return {
            "name": data["name"],
            "command": data["command"],
            "workdir": data["workdir"],
            "gpus": gpus,
            "gpuwrap_config": {"enabled": True} if gpus and data["pin_gpus"] else None,
            "host": data["host"],
            "sweep": data["sweep"],
            "plan": data["plan"],
            "auto_start": data["auto_start"],
        }


class RunFilterForm(forms.Form):
    """Renders the runs filter; experiments.api.filters.RunFilter does the filtering."""

    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *RunStatus.choices])
    host = forms.ModelChoiceField(
        queryset=Host.objects.all(), required=False, to_field_name="name", empty_label="Any host"
    )
    sweep_id = forms.ModelChoiceField(
        queryset=Sweep.objects.order_by("-created_at"),
        required=False,
        empty_label="Any sweep",
        label="Sweep",
    )


class PlanForm(forms.Form):
    title = forms.CharField(max_length=300)
    goal = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False)
    raw_markdown = forms.CharField(
        label="Plan (markdown)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 18, "class": "mono"}),
        help_text="Sections are read from headings: ## Objective, ## Compute Setup, ## Approach, "
        "## Parameters to Sweep, ## Metrics, ## Success Criteria, ## Risks & Mitigations, "
        "## Estimated Effort.",
    )


class CommentForm(forms.Form):
    comment = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 2, "placeholder": "Comment"})
    )


class ApproveForm(forms.Form):
    comment = forms.CharField(
        required=False,
        label="Note to the author",
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "e.g. what to watch, limits"}),
    )
    gpu_hours_budget = forms.FloatField(
        required=False,
        min_value=0,
        label="GPU-hour budget",
        widget=forms.NumberInput(attrs={"step": "any", "placeholder": "no limit"}),
    )


class RejectForm(forms.Form):
    comment = forms.CharField(
        required=False,
        label="Reason for rejecting",
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "Why not"}),
    )


class RequestChangesForm(forms.Form):
    comment = forms.CharField(
        label="Changes wanted",
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "Which changes do you want?"}),
    )


class TokenForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "e.g. laptop, agent-1"}),
    )
