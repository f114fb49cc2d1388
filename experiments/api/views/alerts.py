"""Alerts and their answers."""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from experiments import services
from experiments.actors import Actor
from experiments.api import serializers as s
from experiments.api.filters import AlertFilter
from experiments.api.views.common import (
    CONFLICT,
)
from experiments.models import Alert
from labsite.api import shown_key


class AlertViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Alerts with the answers they accept; answering one acts on its run."""

    serializer_class = s.AlertSerializer
    filterset_class = AlertFilter

    def get_queryset(self) -> QuerySet[Alert]:
        return Alert.objects.select_related("responded_by", "run")

    def get_object(self) -> Alert:
        key = str(self.kwargs["pk"])
        alert = (
            self.get_queryset().filter(pk=int(key)).first()
            if key.isascii() and key.isdigit() and len(key) <= 18
            else None
        )
        if alert is None:
            raise NotFound(f"Alert not found: {shown_key(key)}")
        return alert

    @extend_schema(request=s.AlertRespondSerializer, responses={200: s.AlertSerializer, **CONFLICT})
    @action(detail=True, methods=["post"])
    def respond(self, request: Request, pk: str) -> Response:
        """Answer with one of the alert's choices (stop and rerun act on the run)."""
        data = s.AlertRespondSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        alert = services.alert_respond(
            alert=self.get_object(),
            actor=Actor.from_request(request),
            choice=data.validated_data["choice"],
        )
        return Response(s.AlertSerializer(alert).data)
