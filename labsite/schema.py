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


ERROR_SCHEMA = {
    "type": "object",
    "description": "Every 4xx answer: a readable `detail`; field errors are listed in `errors`.",
    "properties": {
        "detail": {"type": "string"},
        "errors": {"type": "object", "additionalProperties": {}},
    },
    "required": ["detail"],
}
_METHODS = {"get", "put", "post", "patch", "delete"}
_UNSAFE = {"put", "post", "patch", "delete"}


# Views that authenticate nobody (load balancers' health checks): they answer 200 or 503 only.
UNAUTHENTICATED = {"/api/health"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _error_responses(path: str, method: str, operation: dict[str, Any]) -> dict[str, Any]:
    """The 4xx answers this operation can give, from what the operation takes.

    Every API view authenticates (a wrong token is a 401 even where no token is needed) and
    may throttle failed authentication (429); session clients of unsafe methods meet CSRF
    (403). 409 is documented by the views whose services raise Conflict.
    """
    open_to_all = {} in operation.get("security", [{}])
    if path in UNAUTHENTICATED:
        return {}  # no authentication at all: not even a wrong token is looked at
    params = operation.get("parameters", [])
    has_body = "requestBody" in operation
    in_path = {p["name"] for p in params if p.get("in") == "path"}
    out: dict[str, Any] = {}
    # A body sent to a POST that takes none is refused (labsite.api.no_body), too.
    posted = method == "post"
    if has_body or posted or any(p.get("in") == "query" for p in params) or in_path - {"id"}:
        out["400"] = _error("the request is malformed or breaks a rule; `detail` says which")
    out["401"] = _error(
        "the token sent is wrong or revoked" if open_to_all else "no token, or a wrong one"
    )
    if method in _UNSAFE and not open_to_all:
        out["403"] = _error("not allowed for this user (or a browser session without CSRF)")
    if "id" in in_path:
        out["404"] = _error("no object with this id")
    if has_body or posted:
        out["413"] = _error("the body is larger than LABSITE_MAX_BODY_BYTES")
    out["429"] = _error("too many failed authentications from this address; wait a minute")
    return out


def document_error_responses(result: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Add the error answers each operation really gives, all with the shared Error shape."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in _METHODS:
                continue
            responses = operation.setdefault("responses", {})
            for code, response in _error_responses(path, method, operation).items():
                responses.setdefault(code, response)
    return result


# Bodies whose keys are free by design: a prompt skill's variables may come at the top level.
OPEN_BODIES = {"RenderRequest"}


def forbid_unknown_fields(result: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Request bodies refuse keys they do not know (labsite.validation): say so in the schema."""
    for name, component in result.get("components", {}).get("schemas", {}).items():
        if name.endswith("Request") and name not in OPEN_BODIES and "properties" in component:
            component["additionalProperties"] = False
    return result
