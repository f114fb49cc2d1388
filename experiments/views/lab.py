"""The GPU board and the API tokens pages."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_POST

from experiments import selectors
from experiments.forms import (
    TokenForm,
)
from experiments.views.common import (
    is_partial,
    login_required,
)
from labsite.models import ApiToken

# --- cluster -----------------------------------------------------------------------------


def _gpu_card(gpu: dict[str, Any]) -> dict[str, Any]:
    total, used = gpu["memory_total_mb"], gpu["memory_used_mb"]
    return {
        **gpu,
        "memory_pct": min(100, round(100 * used / total)) if total else 0,
        "memory_used_gib": f"{used / 1024:.1f}",
        "memory_total_gib": f"{total / 1024:.0f}",
        "state_label": "busy (not ours)" if gpu["state"] == selectors.GPU_FOREIGN else gpu["state"],
    }


@login_required
def cluster(request: HttpRequest) -> HttpResponse:
    """The GPU board from the latest inventory; HTMX refreshes it every 5 s."""
    state = selectors.cluster_state()
    for host in state["hosts"]:
        host["gpus"] = [_gpu_card(gpu) for gpu in host["gpus"]]
    context = {"cluster": state}
    if is_partial(request):
        return render(request, "experiments/partials/cluster_board.html", context)
    return render(request, "experiments/cluster.html", context)


def _my_tokens(request: HttpRequest) -> QuerySet[ApiToken]:
    """Only the signed-in user's tokens: another user's token id is simply not found."""
    user: Any = request.user  # login_required: never anonymous here
    return ApiToken.objects.filter(user=user)


@login_required
def token_list(request: HttpRequest) -> HttpResponse:
    tokens = _my_tokens(request).order_by("revoked", "-created_at")
    return render(request, "experiments/token_list.html", {"tokens": tokens, "form": TokenForm()})


@login_required
@require_POST
def token_create(request: HttpRequest) -> HttpResponse:
    """Issue a token and show its raw value on this response only; it is never stored."""
    form = TokenForm(request.POST)
    if not form.is_valid():
        tokens = _my_tokens(request).order_by("revoked", "-created_at")
        return render(
            request, "experiments/token_list.html", {"tokens": tokens, "form": form}, status=400
        )
    token, raw = ApiToken.issue(request.user, name=form.cleaned_data["name"])
    response = render(
        request,
        "experiments/token_created.html",
        {"token": token, "raw": raw, "api_base": request.build_absolute_uri("/api")},
    )
    add_never_cache_headers(response)
    return response


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    revoked = _my_tokens(request).filter(pk=token_id, revoked=False).update(revoked=True)
    if revoked:
        messages.success(request, "Token revoked; requests that send it now get 401.")
    else:
        messages.error(request, "No such active token.")
    return redirect("token_list")
