"""The sweeps pages."""

from __future__ import annotations

from typing import Any

from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from experiments import selectors
from experiments.choices import (
    TERMINAL,
)
from experiments.views.common import (
    PAGE_SIZE,
    login_required,
    object_or_404,
)

# --- sweeps ------------------------------------------------------------------------------


def _sweep_row(sweep: Any) -> dict[str, Any]:
    counts = selectors.sweep_counts(sweep)
    total = sum(counts.values())
    done = sum(counts[s] for s in TERMINAL)
    return {
        "sweep": sweep,
        "counts": {k: v for k, v in counts.items() if v},
        "status": selectors.sweep_status(counts),
        "total": total,
        "done": done,
    }


@login_required
def sweep_list(request: HttpRequest) -> HttpResponse:
    # Meta.ordering does not apply to the annotated (GROUP BY) query: order explicitly.
    sweeps = selectors.sweeps_list().select_related("plan").order_by("-created_at", "id")
    page = Paginator(sweeps, PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [_sweep_row(sweep) for sweep in page]
    return render(request, "experiments/sweep_list.html", {"page": page, "rows": rows})


@login_required
def sweep_detail(request: HttpRequest, sweep_id: str) -> HttpResponse:
    sweep = object_or_404(selectors.sweeps_list().select_related("plan"), pk=sweep_id)
    runs = selectors.runs_list().filter(sweep=sweep).order_by("created_at", "id")
    return render(
        request,
        "experiments/sweep_detail.html",
        {**_sweep_row(sweep), "runs": runs, "param_names": list(sweep.parameters)},
    )
