"""Plans: agents write them, PIs decide."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from experiments import services
from experiments.actors import Actor
from experiments.api import serializers as s
from experiments.api.filters import PlanFilter
from experiments.api.views.common import (
    CONFLICT,
)
from experiments.models import Plan
from labsite.api import key_or_404


class PlanViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Plans: agents write them, PIs approve, reject or ask for changes."""

    filterset_class = PlanFilter

    def get_queryset(self) -> QuerySet[Plan]:
        qs = Plan.objects.select_related("author", "reviewer")
        if self.action == "retrieve":
            qs = qs.prefetch_related("events__actor_user")
        return qs

    def get_serializer_class(self) -> type[s.PlanSerializer]:
        return s.PlanDetailSerializer if self.action != "list" else s.PlanListSerializer

    def get_object(self) -> Plan:
        key_or_404(self.kwargs["pk"], "Plan")
        plan = self.get_queryset().filter(pk=self.kwargs["pk"]).first()
        if plan is None:
            raise NotFound(f"Plan not found: {self.kwargs['pk']}")
        return plan

    def _out(self, plan: Plan) -> dict[str, Any]:
        plan = (
            Plan.objects.select_related("author", "reviewer")
            .prefetch_related("events__actor_user")
            .get(pk=plan.pk)
        )
        return s.PlanDetailSerializer(plan).data

    @extend_schema(request=s.PlanCreateSerializer, responses={201: s.PlanDetailSerializer})
    def create(self, request: Request) -> Response:
        """Save a plan (a draft); its sections are parsed from the markdown headings."""
        data = s.PlanCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        plan = services.plan_create(
            actor=Actor.from_request(request),
            title=v["title"],
            goal=v.get("goal", ""),
            raw_markdown=v.get("raw_markdown", ""),
            session_id=v.get("session_id"),
        )
        return Response(self._out(plan), status=status.HTTP_201_CREATED)

    @extend_schema(
        request=s.PlanUpdateSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    def partial_update(self, request: Request, pk: str) -> Response:
        """Edit a draft (or a plan with changes requested)."""
        data = s.PlanUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        plan = services.plan_update(
            plan=self.get_object(), actor=Actor.from_request(request), **data.validated_data
        )
        return Response(self._out(plan))

    def _decide(self, request: Request, serializer: type[Any], service: Any) -> Response:
        data = serializer(data=request.data)
        data.is_valid(raise_exception=True)
        plan = service(
            plan=self.get_object(), actor=Actor.from_request(request), **data.validated_data
        )
        return Response(self._out(plan))

    @extend_schema(
        request=s.PlanDecisionSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    @action(detail=True, methods=["post"])
    def submit(self, request: Request, pk: str) -> Response:
        """Send a draft for review."""
        return self._decide(request, s.PlanDecisionSerializer, services.plan_submit)

    @extend_schema(
        request=s.PlanApproveSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str) -> Response:
        """PI only: approve, optionally with a GPU-hour budget; held runs are queued."""
        return self._decide(request, s.PlanApproveSerializer, services.plan_approve)

    @extend_schema(
        request=s.PlanDecisionSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    @action(detail=True, methods=["post"])
    def reject(self, request: Request, pk: str) -> Response:
        """PI only: reject; its waiting runs are stopped with reason plan_rejected."""
        return self._decide(request, s.PlanDecisionSerializer, services.plan_reject)

    @extend_schema(
        request=s.PlanDecisionSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    @action(detail=True, methods=["post"], url_path="request-changes")
    def request_changes(self, request: Request, pk: str) -> Response:
        """PI only: send the plan back to its author with a comment."""
        return self._decide(request, s.PlanDecisionSerializer, services.plan_request_changes)

    @extend_schema(
        request=s.PlanDecisionSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    @action(detail=True, methods=["post"])
    def archive(self, request: Request, pk: str) -> Response:
        """Put a plan away (its author, a PI or an admin)."""
        return self._decide(request, s.PlanDecisionSerializer, services.plan_archive)
