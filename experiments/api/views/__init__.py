"""The REST API: parse input, call one service, render the result. Never SSH here."""

from experiments.api.views.agents import PromptSkillViewSet, SessionEventsView, api_catalog
from experiments.api.views.alerts import AlertViewSet
from experiments.api.views.cluster import (
    ClusterDetectView,
    ClusterView,
    HealthView,
    SystemHealthView,
)
from experiments.api.views.plans import PlanViewSet
from experiments.api.views.runs import RunViewSet
from experiments.api.views.sweeps import SweepViewSet

__all__ = [
    "AlertViewSet",
    "ClusterDetectView",
    "ClusterView",
    "HealthView",
    "PlanViewSet",
    "PromptSkillViewSet",
    "RunViewSet",
    "SessionEventsView",
    "SweepViewSet",
    "SystemHealthView",
    "api_catalog",
]
