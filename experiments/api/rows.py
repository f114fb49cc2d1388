"""Runs as the API shows them, built from plain rows: the reads agents repeat in their loops.

RunSerializer and RunListSerializer define the shape; this builds the same JSON (a test holds
the two equal) without model instances or DRF fields: one query for the rows, one for their
leases. A page of 100 runs took 58 ms through the serializers (most of it building fields and
models per row) on the 2-core machine where research-agent answers from memory in 18.
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any

from django.db import connection
from django.db.models import DateTimeField, F, QuerySet
from django.db.models.functions import Length, Substr
from django.utils import timezone

from experiments.api.serializers import RunSerializer, redact_env
from experiments.models import GpuLease, Run
from labsite.compiled import Compiled
from labsite.validation import lab_limit

FIELDS = list(RunSerializer.Meta.fields)
# RunSerializer's fields that are not one of the run's own columns as it is stored.
_BUILT = {"command", "host", "leased_gpus", "created_by"}
_TIMES = [
    name
    for name in FIELDS
    if name not in _BUILT and isinstance(Run._meta.get_field(name), DateTimeField)
]
_PLAIN = [name for name in FIELDS if name not in _BUILT and name not in _TIMES]


def _time(value: datetime | None, zone: tzinfo) -> str | None:
    """As DRF's DateTimeField writes it: in the current time zone (`zone`), UTC as `Z`."""
    if value is None:
        return None
    text = value.astimezone(zone).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


_JOINED = {"host_name": F("host__name"), "created_by_name": F("created_by__username")}
# One run, whole, as GET /runs/{id} answers it: the two queries compiled once (labsite.compiled).
_ONE_RUN = Compiled(
    lambda pk: Run.objects.filter(pk=pk).values(
        *_PLAIN, *_TIMES, **_JOINED, command_text=F("command")
    ),
    arity=1,
)
_ONE_RUNS_LEASES = Compiled(
    lambda pk: (
        GpuLease.objects.filter(run_id=pk, released_at__isnull=True)
        .order_by("id")
        .values_list("run_id", "gpu__index", "gpu__uuid")
    ),
    arity=1,
)


def run_detail(pk: str) -> dict[str, Any] | None:
    """GET /runs/{id}: the run whole, or None."""
    rows = _ONE_RUN.dicts(pk)
    return (
        _shape(rows, _ONE_RUNS_LEASES.rows(pk) if rows else [], summary=False)[0] if rows else None
    )


_ACTIVE_LEASES = Compiled(
    lambda: (
        GpuLease.objects.filter(released_at__isnull=True)
        .order_by("id")
        .values_list("run_id", "gpu__index", "gpu__uuid")
    ),
    arity=0,
)
# The unfiltered page agents ask for (`GET /runs?limit=100`), compiled per (limit, offset,
# list command length): Django writes LIMIT and OFFSET into the SQL text.
_PAGES: dict[tuple[int, int, int], Compiled] = {}


def _page_query(limit: int, offset: int, most: int) -> Compiled:
    key = (limit, offset, most)
    query = _PAGES.get(key)
    if query is None:
        if len(_PAGES) >= 64:
            _PAGES.clear()
        query = _PAGES[key] = Compiled(
            lambda: Run.objects.order_by("-created_at").values(
                *_PLAIN,
                *_TIMES,
                **_JOINED,
                command_head=Substr("command", 1, most),
                command_length=Length("command"),
            )[offset : offset + limit],
            arity=0,
        )
    return query


def run_count() -> int:
    """How many runs there are (the unfiltered list's `count`), without the ORM."""
    table = connection.ops.quote_name(Run._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {table}")  # noqa: S608 - the model's own table
        (count,) = cursor.fetchone()
    return int(count)


def unfiltered_page(*, limit: int, offset: int) -> list[dict[str, Any]]:
    """`GET /runs?limit=&offset=` with no filter, newest first: what run_rows gives for that
    page, from queries compiled once (the rows, and the lab's active leases)."""
    most = lab_limit("LIST_COMMAND_CHARS")
    rows = _page_query(limit, offset, most).dicts()
    ids = {row["id"] for row in rows}
    leases = [lease for lease in _ACTIVE_LEASES.rows() if lease[0] in ids] if rows else []
    return _shape(rows, leases, summary=True)


def run_rows(queryset: QuerySet[Run], *, summary: bool) -> list[dict[str, Any]]:
    """The runs of `queryset` (already filtered, ordered and sliced to a page) as API JSON:
    list rows with the head of each command (`summary`, as RunListSerializer), or whole."""
    most = lab_limit("LIST_COMMAND_CHARS")
    extra: dict[str, Any] = dict(_JOINED)
    if summary:
        extra |= {"command_head": Substr("command", 1, most), "command_length": Length("command")}
    else:
        extra["command_text"] = F("command")
    rows = list(queryset.values(*_PLAIN, *_TIMES, **extra))
    leases: list[tuple[Any, ...]] = []
    if rows:
        leases = list(
            GpuLease.objects.filter(
                run_id__in=[row["id"] for row in rows], released_at__isnull=True
            )
            .order_by("id")
            .values_list("run_id", "gpu__index", "gpu__uuid")
        )
    return _shape(rows, leases, summary=summary)


def _shape(
    rows: list[dict[str, Any]], lease_rows: list[tuple[Any, ...]], *, summary: bool
) -> list[dict[str, Any]]:
    most = lab_limit("LIST_COMMAND_CHARS")
    zone = timezone.get_current_timezone()
    leases: dict[str, list[dict[str, Any]]] = {row["id"]: [] for row in rows}
    for run_id, index, uuid in lease_rows:
        leases[run_id].append({"index": index, "uuid": uuid})
    out = []
    for row in rows:
        item: dict[str, Any] = {}
        for name in FIELDS:
            if name == "command":
                if summary:
                    item["command"] = row["command_head"][:most]
                else:
                    item["command"] = row["command_text"]
            elif name == "host":
                item["host"] = row["host_name"]
            elif name == "leased_gpus":
                item["leased_gpus"] = leases[row["id"]]
            elif name == "created_by":
                item["created_by"] = row["created_by_name"]
            elif name == "env":
                item["env"] = redact_env(row["env"])
            elif name in _TIMES:
                item[name] = _time(row[name], zone)
            else:
                item[name] = row[name]
        if summary:
            item["command_truncated"] = row["command_length"] > most
        out.append(item)
    return out
