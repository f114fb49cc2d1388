"""The cluster, its capacity, and the server's own health."""

from __future__ import annotations

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import permissions, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clusters import services as cluster_services
from clusters import tasks as cluster_tasks
from experiments import selectors
from labsite.api import no_body


class ClusterView(APIView):
    """The cluster from the latest inventory, with GPU totals and runs by status."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(selectors.cluster_state())


class ClusterDetectView(APIView):
    """Ask a worker to detect the cluster (the local host's GPUs, Slurm's sinfo) and answer 202
    at once with the cluster as the latest inventory knows it; GET /api/cluster shows the new
    inventory once each host's inventory_at is past detect.requested_at."""

    @extend_schema(request=None, responses={202: OpenApiTypes.OBJECT})
    def post(self, request: Request) -> Response:
        # nvidia-smi and sinfo run in the worker: sinfo hangs while slurmctld is down, and a
        # request must not. The local host's row is only a database write, so it is there at
        # once for the agents that look for it.
        no_body(request)
        requested_at = timezone.now()
        cluster_services.host_ensure_local()
        cluster_tasks.refresh_local_later()
        state = selectors.cluster_state()
        state["detect"] = {"status": "requested", "requested_at": requested_at}
        return Response(state, status=status.HTTP_202_ACCEPTED)


class SystemHealthView(APIView):
    """Counts and capacity only; open to the agents' preflight without a token."""

    permission_classes = [permissions.AllowAny]

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(selectors.system_health_recent())


class HealthView(APIView):
    """The server, its database and its broker: open to load balancers and health checks."""

    # No identity is needed, so none is looked up: a bad token or a dead session store cannot
    # turn a health check into a 401 or a 500.
    authentication_classes: list[type] = []
    permission_classes = [permissions.AllowAny]

    @extend_schema(
        responses={
            200: OpenApiTypes.OBJECT,
            503: OpenApiResponse(
                OpenApiTypes.OBJECT, description='{"status": "down", ...}: a part is down'
            ),
        },
    )
    def get(self, request: Request) -> Response:
        health = selectors.service_health()
        code = (
            status.HTTP_200_OK if health["status"] == "ok" else status.HTTP_503_SERVICE_UNAVAILABLE
        )
        return Response(health, status=code)
