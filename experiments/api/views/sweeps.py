"""Sweeps: a grid expanded into runs, or a wild sweep an agent fills."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from experiments import selectors, services
from experiments.actors import Actor
from experiments.api import serializers as s
from experiments.api.filters import SweepFilter
from experiments.api.views.common import (
    lookup,
    run_options,
)
from experiments.models import Plan, Sweep
from labsite.api import key_or_404


class SweepViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Sweeps: a parameter grid expanded into runs, or a wild sweep an agent fills."""

    filterset_class = SweepFilter

    def get_queryset(self) -> QuerySet[Sweep]:
        return selectors.sweeps_list()

    def get_serializer_class(self) -> type[s.SweepSerializer]:
        return s.SweepDetailSerializer if self.action != "list" else s.SweepSerializer

    def get_object(self) -> Sweep:
        key_or_404(self.kwargs["pk"], "Sweep")
        sweep = self.get_queryset().filter(pk=self.kwargs["pk"]).first()
        if sweep is None:
            raise NotFound(f"Sweep not found: {self.kwargs['pk']}")
        return sweep

    def _out(self, sweep: Sweep) -> dict[str, Any]:
        return s.SweepDetailSerializer(self.get_queryset().get(pk=sweep.pk)).data

    def retrieve(self, request: Request, pk: str) -> Response:
        """A sweep with its runs in grid order."""
        return Response(self._out(self.get_object()))

    @extend_schema(request=s.SweepCreateSerializer, responses={201: s.SweepDetailSerializer})
    def create(self, request: Request) -> Response:
        """Expand a grid (dict of lists) into one run per point; refuses grids over max_runs."""
        data = s.SweepCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        sweep = services.sweep_create_grid(
            actor=Actor.from_request(request),
            name=v["name"],
            base_command=v["base_command"],
            parameters=v["parameters"],
            max_runs=v.get("max_runs"),
            goal=v.get("goal", ""),
            auto_start=v["auto_start"],
            chat_session_id=v.get("chat_session_id") or "",
            plan=lookup(Plan, v.get("plan_id"), "Plan"),
            run_options=run_options(v),
            slurm_array_throttle=v.get("slurm_array_throttle"),
        )
        return Response(self._out(sweep), status=status.HTTP_201_CREATED)

    @extend_schema(request=s.WildSweepCreateSerializer, responses={201: s.SweepDetailSerializer})
    @action(detail=False, methods=["post"])
    def wild(self, request: Request) -> Response:
        """Create an empty sweep for an agent session; add runs with POST /runs and sweep_id."""
        data = s.WildSweepCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        sweep = services.sweep_create_wild(
            actor=Actor.from_request(request),
            name=v["name"],
            goal=v.get("goal", ""),
            chat_session_id=v.get("chat_session_id") or "",
            plan=lookup(Plan, v.get("plan_id"), "Plan"),
        )
        return Response(self._out(sweep), status=status.HTTP_201_CREATED)
