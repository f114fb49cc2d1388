"""API plumbing shared by the apps: pagination, JSON errors with a top-level `detail`."""

from __future__ import annotations

import logging
import re
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, IntegrityError
from django.db.models import QuerySet
from django.http import Http404, JsonResponse
from rest_framework import exceptions, pagination, routers, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from labsite.errors import Conflict
from labsite.parsers import body_too_large
from labsite.validation import INT64_MAX

log = logging.getLogger(__name__)

# Ids and names in a URL: anything else (NUL, spaces, 5,000 digits) is not found without asking
# the database, which would refuse NUL with an error rather than an empty answer.
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")


class ErrorSerializer(serializers.Serializer):
    """Every 4xx answer: a readable `detail`; field errors add their lists in `errors`."""

    detail = serializers.CharField()
    # The metaclass takes fields off the class, so this does not hide Serializer.errors.
    errors = serializers.DictField(required=False)  # type: ignore[assignment]


def query_int(
    request: Request, name: str, *, default: int, minimum: int, maximum: int = INT64_MAX
) -> int:
    """An integer query parameter; absent or empty means the default, anything else that is
    not an integer in range is a 400 naming the parameter (never silently the default)."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,19}", text) or not minimum <= int(text) <= maximum:
        bounds = f"from {minimum} to {maximum}" if maximum < INT64_MAX else f">= {minimum}"
        raise exceptions.ValidationError({name: [f"must be an integer {bounds}"]})
    return int(text)


def no_body(request: Request) -> None:
    """For actions that take no body: one with anything in it is a 400, never ignored (a
    `rerun` with a new `command` would otherwise rerun the old one). Nothing, `{}` and an
    empty form are fine: that is what `curl -X POST` and `-d '{}'` send."""
    data = request.data
    if not data:
        return
    keys = [str(key)[:50] for key in data] if hasattr(data, "keys") else []
    what = f"unknown field(s): {', '.join(sorted(keys)[:10])}" if keys else "a body was sent"
    raise exceptions.ValidationError(
        {api_settings.NON_FIELD_ERRORS_KEY: [f"this action takes no body; {what}"]}
    )


def shown_key(value: str) -> str:
    """A key from a URL as an error message may quote it: short, and escaped."""
    return value[:64].encode("unicode_escape").decode("ascii")


def key_or_404(value: str, label: str) -> str:
    """A URL's object key, or a 404 without a query when no object could have it."""
    if not KEY_PATTERN.fullmatch(value):
        raise exceptions.NotFound(f"{label} not found: {shown_key(value)}")
    return value


class OptionalSlashRouter(routers.SimpleRouter):
    """Agents write paths without a trailing slash; accept both."""

    def __init__(self) -> None:
        super().__init__()
        self.trailing_slash = "/?"


class Pagination(pagination.LimitOffsetPagination):
    """limit/offset; a limit over max_limit is cut to it, a malformed one is a 400."""

    default_limit = 50
    max_limit = 500

    def get_limit(self, request: Request) -> int:
        limit = query_int(request, self.limit_query_param, default=self.default_limit, minimum=1)
        return min(limit, self.max_limit)

    def get_offset(self, request: Request) -> int:
        return query_int(request, self.offset_query_param, default=0, minimum=0)

    def bounds(self, request: Request) -> tuple[int, int]:
        """The page asked for: (limit, offset)."""
        return self.get_limit(request), self.get_offset(request)

    def answer(self, request: Request, count: int, results: list[Any]) -> Response:
        """The paginated answer for a page a view read itself (count: of the whole list)."""
        self.request = request
        self.limit, self.offset = self.bounds(request)
        self.count = count
        return self.get_paginated_response(results)

    def page_of(self, queryset: QuerySet[Any], request: Request) -> QuerySet[Any]:
        """The page's slice of `queryset`, not yet read (for views that read it as rows);
        get_paginated_response then answers as paginate_queryset would have."""
        self.request = request
        self.limit = self.get_limit(request)
        self.offset = self.get_offset(request)
        self.count = self.get_count(queryset)
        return queryset[self.offset : self.offset + self.limit]

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        """The bounds get_limit and get_offset enforce, so the schema says what is a 400."""
        bounds = {self.limit_query_param: {"minimum": 1}, self.offset_query_param: {"minimum": 0}}
        params = super().get_schema_operation_parameters(view)
        for param in params:
            param["schema"].update(bounds.get(param["name"], {}))
        return params


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
    if isinstance(exc, RequestDataTooBig):
        exc = body_too_large()
    if isinstance(exc, DataError | IntegrityError):
        # The exception's text carries the row's values (PostgreSQL's DETAIL and CONTEXT lines),
        # secrets included: it is neither logged nor sent back.
        set_rollback()
        view = context.get("view")
        log.warning(
            "the database refused a value in %s (%s); the input checks missed it",
            type(view).__name__ if view is not None else "a request",
            type(exc).__name__,
        )
        return Response(
            {"detail": "the database refused a value in this request; check the values sent"},
            status=status.HTTP_400_BAD_REQUEST,
        )
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
