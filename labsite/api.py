"""API plumbing shared by the apps: pagination, JSON errors with a top-level `detail`."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, JsonResponse
from rest_framework import exceptions, pagination, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from labsite.errors import Conflict


class Pagination(pagination.LimitOffsetPagination):
    default_limit = 50
    max_limit = 500


def _first_message(data: Any, path: str = "") -> str:
    if isinstance(data, dict):
        for key, value in data.items():
            sub = key if not path else f"{path}.{key}"
            if key == "non_field_errors":
                sub = path
            return _first_message(value, sub)
    if isinstance(data, list) and data:
        return _first_message(data[0], path)
    text = str(data)
    return f"{path}: {text}" if path else text


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Every error is JSON with a readable `detail`; field errors keep their lists in `errors`."""
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        exc = exceptions.ValidationError(detail=detail)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "Not found.")
    if isinstance(exc, Conflict):
        return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    if isinstance(exc, exceptions.ValidationError):
        response.data = {"detail": _first_message(data), "errors": data}
    elif not (isinstance(data, dict) and "detail" in data):
        response.data = {"detail": _first_message(data)}
    return response


def json_404(request: Any, exception: Exception | None = None) -> JsonResponse:
    from django.views.defaults import page_not_found

    if request.path.startswith("/api/"):
        return JsonResponse(
            {"detail": f"Not found: {request.path}"}, status=status.HTTP_404_NOT_FOUND
        )
    return page_not_found(request, exception)  # type: ignore[arg-type,return-value]


def json_500(request: Any) -> JsonResponse:
    from django.views.defaults import server_error

    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Internal error; it has been logged."}, status=500)
    return server_error(request)  # type: ignore[return-value]
