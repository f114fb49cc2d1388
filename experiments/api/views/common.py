"""What the API views share: documented refusals and objects named in request bodies."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse
from rest_framework import status
from rest_framework.exceptions import APIException

from clusters.api.views import find_host
from clusters.models import Host
from labsite.api import KEY_PATTERN, ErrorSerializer

# Documented beside the success answer of each operation whose service can raise Conflict.
CONFLICT = {409: OpenApiResponse(ErrorSerializer, description="the object's state forbids it")}
REFUSED = {400: OpenApiResponse(ErrorSerializer, description="the request was refused")}


class BadReference(APIException):
    """A request body names an object that does not exist."""

    status_code = status.HTTP_400_BAD_REQUEST


def lookup(model: type[Any], pk: Any, label: str) -> Any:
    """An object referenced in a request body; unknown ids are a 400 naming the id."""
    if pk in (None, ""):
        return None
    obj = model.objects.filter(pk=str(pk)).first() if KEY_PATTERN.fullmatch(str(pk)) else None
    if obj is None:
        raise BadReference(f"{label} not found: {pk}")
    return obj


def body_host(name: Any) -> Host | None:
    if name in (None, ""):
        return None
    host = find_host(str(name))
    if host is None:
        raise BadReference(f"Host not found: {name}")
    return host


def run_options(data: dict[str, Any]) -> dict[str, Any]:
    """Options shared by a single run and a grid sweep's runs."""
    options: dict[str, Any] = {}
    keys = (
        "gpuwrap_config",
        "gpus",
        "min_free_mem_mb",
        "cpus",
        "memory_mb",
        "workdir",
        "env",
        "slurm",
    )
    for key in (*keys, "priority"):
        if key in data:
            options[key] = data[key]
    options["host"] = body_host(data.get("host"))
    return options
