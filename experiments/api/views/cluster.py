"""The cluster, its capacity, and the server's own health."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import permissions
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clusters import services as cluster_services
from experiments import selectors


class ClusterView(APIView):
    """The cluster from the latest inventory, with GPU totals and runs by status."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(selectors.cluster_state())


class ClusterDetectView(APIView):
    """Detect the cluster now: the local host's GPUs (NVML, else nvidia-smi) and Slurm (sinfo)."""

    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request: Request) -> Response:
        # Local calls with timeouts (NVML, nvidia-smi, sinfo); remote hosts are the poller's job.
        cluster_services.inventory_refresh_local()
        cluster_services.slurm_detect()
        return Response(selectors.cluster_state())


class SystemHealthView(APIView):
    """Counts and capacity only; open to the agents' preflight without a token."""

    permission_classes = [permissions.AllowAny]

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(selectors.system_health())


class HealthView(APIView):
    """The server, its database and its broker."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(selectors.service_health())
