"""Hosts: everyone reads; admins register, change and remove them.

Probes run in a worker, never in the request: registering, probing or accepting a key answers
202 at once with the host as the database knows it and a `probe` saying where to poll
(`GET /api/hosts/{name}` until `probed_at` is past `probe.requested_at`).
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from clusters import services, tasks
from clusters.api import serializers as s
from clusters.models import Host
from labsite.api import KEY_PATTERN, ErrorSerializer, no_body, shown_key
from labsite.errors import Conflict
from labsite.roles import is_admin


def find_host(key: str) -> Host | None:
    """A host by name, or by numeric id; keys no host could have never reach the database."""
    if not KEY_PATTERN.fullmatch(key):
        return None
    host = Host.objects.filter(name=key).first()
    if host is None and key.isascii() and key.isdigit() and len(key) <= 18:
        host = Host.objects.filter(pk=int(key)).first()
    return host


class IsAdminForWrites(permissions.BasePermission):
    message = "only an admin may change hosts"

    def has_permission(self, request: Request, view: Any) -> bool:
        if request.method in permissions.SAFE_METHODS or getattr(view, "action", "") == "probe":
            return True
        return is_admin(request.user)


class HostViewSet(viewsets.ModelViewSet[Host]):
    """The lab's machines; on creation the host key is pinned (or checked against the one given)."""

    permission_classes = [permissions.IsAuthenticated, IsAdminForWrites]
    http_method_names = ["get", "post", "patch", "delete"]

    def get_queryset(self) -> QuerySet[Host]:
        return Host.objects.prefetch_related("gpus")

    def get_serializer_class(self) -> type:
        return s.HostSerializer if self.action in ("list", "retrieve") else s.HostWriteSerializer

    def get_object(self) -> Host:
        key = str(self.kwargs["pk"])
        host = find_host(key)
        if host is None:
            raise NotFound(f"Host not found: {shown_key(key)}")
        return host

    def _out(self, host: Host, code: int = status.HTTP_200_OK) -> Response:
        host = self.get_queryset().get(pk=host.pk)
        return Response(s.HostSerializer(host, context={"request": self.request}).data, status=code)

    def _probe_later(self, host: Host) -> Response:
        """Ask a worker to probe (SSH can take seconds, or hang) and answer 202 at once."""
        requested_at = timezone.now()
        tasks.probe_later(host.pk)
        response = self._out(host, status.HTTP_202_ACCEPTED)
        response.data["probe"] = {
            "status": "requested",
            "requested_at": requested_at,
            "poll": reverse("host-detail", kwargs={"pk": host.name}),
        }
        return response

    @extend_schema(request=s.HostWriteSerializer, responses={202: s.HostProbeSerializer})
    def create(self, request: Request) -> Response:
        """Register a host and ask a worker to probe it: the key is pinned on first contact
        (poll GET /api/hosts/{name} for its fingerprint and state)."""
        data = s.HostWriteSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        key_text = values.pop("private_key", None)
        if key_text:
            values["identity_file"] = services.store_private_key(
                host_name=values["name"], key_text=key_text
            )
        host = Host.objects.create(**values)
        return self._probe_later(host)

    @extend_schema(request=s.HostWriteSerializer, responses=s.HostSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        """Change a host; a new address or port needs its key pinned again."""
        host = self.get_object()
        data = s.HostWriteSerializer(host, data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        key_text = values.pop("private_key", None)
        if key_text:
            values["identity_file"] = services.store_private_key(
                host_name=host.name, key_text=key_text
            )
        if {"hostname", "port"} & values.keys() and "host_key_fingerprint" not in values:
            values["host_key_fingerprint"] = ""
        Host.objects.filter(pk=host.pk).update(**values)
        return self._out(host)

    @extend_schema(
        responses={
            204: None,
            409: OpenApiResponse(ErrorSerializer, description="the host has runs; disable it"),
        }
    )
    def destroy(self, request: Request, pk: str) -> Response:
        """Remove a host that never ran anything; otherwise disable it (runs keep their history)."""
        host = self.get_object()
        if host.runs.exists():
            raise Conflict(f"host {host.name} has runs; disable it instead (PATCH enabled=false)")
        host.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses={202: s.HostProbeSerializer})
    @action(detail=True, methods=["post"])
    def probe(self, request: Request, pk: str) -> Response:
        """Ask a worker to check reachability: online, offline or key_mismatch (poll the host)."""
        no_body(request)
        return self._probe_later(self.get_object())

    @extend_schema(request=s.AcceptKeySerializer, responses={202: s.HostProbeSerializer})
    @action(detail=True, methods=["post"], url_path="accept-key")
    def accept_key(self, request: Request, pk: str) -> Response:
        """Admin only: trust the key the host now presents (give its fingerprint to confirm);
        a worker then probes it with that key."""
        data = s.AcceptKeySerializer(data=request.data)
        data.is_valid(raise_exception=True)
        host = services.host_accept_key(
            host=self.get_object(), fingerprint=data.validated_data["fingerprint"]
        )
        return self._probe_later(host)
