"""What the pages share: sign-in, HTMX partials, errors shown as messages, filters."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from django.contrib.auth.decorators import login_required as django_login_required
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404 as django_get_object_or_404
from django_htmx.http import HttpResponseClientRedirect
from rest_framework.exceptions import ValidationError as FilterError

from experiments.actors import Actor
from experiments.choices import (
    PlanStatus,
)
from labsite.api import KEY_PATTERN
from labsite.errors import Conflict

PAGE_SIZE = 50
SERVICE_ERRORS = (ValidationError, PermissionDenied, Conflict)
PLAN_EDITABLE = frozenset({PlanStatus.DRAFT, PlanStatus.CHANGES_REQUESTED})


def is_partial(request: HttpRequest) -> bool:
    htmx = getattr(request, "htmx", None)
    return htmx is not None and bool(htmx) and not htmx.boosted


def login_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Django's login_required; but a poll from an expired session sends the whole page to
    the login form (HX-Redirect) rather than swapping the form into a table."""
    guarded = django_login_required(view)

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated and is_partial(request):
            here = urlsplit(request.htmx.current_url or request.path)  # type: ignore[attr-defined]
            back = here.path + (f"?{here.query}" if here.query else "")
            return HttpResponseClientRedirect(redirect_to_login(back)["Location"])
        return guarded(request, *args, **kwargs)

    return wrapper


def error_text(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        if hasattr(exc, "error_dict"):
            return "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
        return " ".join(exc.messages)
    return str(exc) or "not allowed"


def object_or_404(queryset: Any, *, pk: str) -> Any:
    """Django's shortcut, but a key no object could have (NUL, odd characters) is a 404
    without a query: PostgreSQL answers NUL with an error, not with no rows."""
    if not KEY_PATTERN.fullmatch(pk):
        raise Http404(pk[:64])
    return django_get_object_or_404(queryset, pk=pk)


def actor_of(request: HttpRequest) -> Actor:
    return Actor.from_request(request)


def filtered(filterset: Any) -> tuple[QuerySet[Any], str]:
    """A filter's rows, or none and the reason when a filter value cannot match."""
    try:
        return filterset.qs, ""
    except FilterError as exc:
        detail = exc.detail
        values = detail.values() if isinstance(detail, dict) else [detail]
        flat = [m for v in values for m in (v if isinstance(v, list) else [v])]
        return filterset.queryset.none(), " ".join(str(m) for m in flat)
