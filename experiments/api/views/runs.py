"""Runs: create, list (newest first, filterable), detail, logs, metrics, start, stop, rerun."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from experiments import selectors, services
from experiments.actors import Actor
from experiments.api import rows
from experiments.api import serializers as s
from experiments.api.filters import RunFilter
from experiments.api.views.common import (
    CONFLICT,
    REFUSED,
    lookup,
    run_options,
)
from experiments.models import Plan, Run, Sweep
from labsite.api import Pagination, key_or_404, no_body, query_int
from labsite.validation import INT64_MAX


class RunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Runs: create, list (newest first, filterable), detail, start, stop, rerun."""

    filterset_class = RunFilter

    def get_queryset(self) -> QuerySet[Run]:
        if self.action == "list":
            return selectors.run_summaries(selectors.runs_list())
        return selectors.runs_list()

    def get_serializer_class(self) -> type[s.RunSerializer]:
        return s.RunListSerializer if self.action == "list" else s.RunSerializer

    def list(self, request: Request) -> Response:
        """Runs newest first, filterable; each row with the head of its command."""
        paginator = self.paginator
        assert isinstance(paginator, Pagination)
        if set(request.query_params) <= {"limit", "offset"}:
            # What agents ask in their loops: the whole lab, newest first, a page of it.
            limit, offset = paginator.bounds(request)
            count, page = rows.unfiltered_page(limit=limit, offset=offset)
            return paginator.answer(request, count, page)
        queryset = self.filter_queryset(Run.objects.all())
        page_of = paginator.page_of(queryset, request)
        return paginator.get_paginated_response(rows.run_rows(page_of, summary=True))

    def retrieve(self, request: Request, pk: str) -> Response:
        """One run, whole."""
        key_or_404(pk, "Run")
        found = rows.run_detail(pk)
        if found is None:
            raise NotFound(f"Run not found: {pk}")
        return Response(found)

    def get_object(self) -> Run:
        key_or_404(self.kwargs["pk"], "Run")
        run = self.get_queryset().filter(pk=self.kwargs["pk"]).first()
        if run is None:
            raise NotFound(f"Run not found: {self.kwargs['pk']}")
        return run

    @extend_schema(request=s.RunCreateSerializer, responses={201: s.RunSerializer})
    def create(self, request: Request) -> Response:
        """Create a run; with auto_start it is queued (held while its plan is not approved)."""
        data = s.RunCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        run = services.run_create(
            actor=Actor.from_request(request),
            name=v.get("name", ""),
            command=v["command"],
            sweep=lookup(Sweep, v.get("sweep_id"), "Sweep"),
            plan=lookup(Plan, v.get("plan_id"), "Plan"),
            params=v.get("params") or {},
            chat_session_id=v.get("chat_session_id") or "",
            auto_start=v["auto_start"],
            **run_options(v),
        )
        return Response(self._created(run), status=status.HTTP_201_CREATED)

    def _out(self, run: Run) -> dict[str, Any]:
        return s.RunSerializer(self.get_queryset().get(pk=run.pk)).data

    def _created(self, run: Run) -> dict[str, Any]:
        """A run just created, as written (no second read: a new run leases nothing yet; a
        worker may have placed it since, which the next GET shows)."""
        run.active_leases = []  # type: ignore[attr-defined]
        return s.RunSerializer(run).data

    @extend_schema(request=None, responses={200: s.RunSerializer, **CONFLICT})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        """Queue a ready run (held instead while its plan is not approved)."""
        no_body(request)
        run = services.run_start(run=self.get_object(), actor=Actor.from_request(request))
        return Response(self._out(run))

    @extend_schema(request=None, responses={200: s.RunSerializer, **CONFLICT})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str) -> Response:
        """Stop a run in any non-terminal state (queued and held included)."""
        no_body(request)
        run = services.run_stop(run=self.get_object(), actor=Actor.from_request(request))
        return Response(self._out(run))

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "offset", int, description="byte offset; negative counts from the end"
            ),
            OpenApiParameter(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 4 * 2**20},
                description="bytes to return (default 65536, max 4 MiB)",
            ),
        ],
        responses=OpenApiTypes.OBJECT,
    )
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, pk: str) -> Response:
        """The run's output (stdout and stderr), as copied from its host by the poller."""
        offset = query_int(request, "offset", default=0, minimum=-INT64_MAX)
        limit = query_int(request, "limit", default=65536, minimum=1, maximum=4 * 2**20)
        return Response(selectors.run_log(self.get_object(), offset=offset, limit=limit))

    @extend_schema(responses=OpenApiTypes.OBJECT)
    @action(detail=True, methods=["get"])
    def metrics(self, request: Request, pk: str) -> Response:
        """Metric series {key: [{step, value}]} from metrics.jsonl, and the latest values."""
        return Response(selectors.run_metrics(self.get_object()))

    @extend_schema(request=None, responses={201: s.RunSerializer, **REFUSED})
    @action(detail=True, methods=["post"])
    def rerun(self, request: Request, pk: str) -> Response:
        """A new run with the same command and settings, linked to this one."""
        no_body(request)
        run = services.run_rerun(run=self.get_object(), actor=Actor.from_request(request))
        return Response(self._created(run), status=status.HTTP_201_CREATED)
