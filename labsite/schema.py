"""The OpenAPI schema, generated once per process (the API does not change while it runs)."""

from __future__ import annotations

import functools
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularAPIView
from rest_framework.request import Request
from rest_framework.response import Response


class ApiTokenScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "labsite.auth.ApiTokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "apiKey", "in": "header", "name": "X-Auth-Token"}


@functools.cache
def openapi_schema() -> dict[str, Any]:
    return SchemaGenerator().get_schema(request=None, public=True)  # type: ignore[no-any-return]


class CachedSchemaView(SpectacularAPIView):
    """/api/openapi.json: the whole API, open to the agents' preflight."""

    @extend_schema(exclude=True)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(
            openapi_schema(),
            headers={"Content-Disposition": 'inline; filename="openapi.json"'},
        )


def strip_trailing_slashes(result: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Document paths the way agents write them: without a trailing slash (both work)."""
    result["paths"] = {
        (path.rstrip("/") or "/"): ops for path, ops in result.get("paths", {}).items()
    }
    return result
