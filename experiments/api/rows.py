"""Runs as the API shows them, built from plain rows: the reads agents repeat in their loops.

RunSerializer and RunListSerializer define the shape; this builds the same JSON (a test holds
the two equal) without model instances, DRF fields or the ORM's converters: one query for the
rows, one for their leases, read as the driver gives them. JSON columns go into the answer as
they are stored (orjson.Fragment), never decoded and encoded again, and times go to orjson as
the driver's datetimes. A page of 100 runs took 58 ms through the serializers on the 2-core
machine where research-agent answers from memory in 7; 10.3 ms through the ORM's values() and
converters.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from operator import itemgetter
from typing import Any

import orjson
from django.core.exceptions import EmptyResultSet
from django.db.models import (
    DateTimeField,
    F,
    FilteredRelation,
    JSONField,
    Q,
    QuerySet,
    Subquery,
)
from django.db.models.functions import Length, Substr
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from experiments.api.serializers import RunSerializer, redact_env
from experiments.models import GpuLease, Run, RunTally
from labsite.compiled import Compiled, fetch_raw
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
_JSON = {name for name in _PLAIN if isinstance(Run._meta.get_field(name), JSONField)}


def _time(value: datetime | None, zone: tzinfo) -> str | None:
    """As DRF's DateTimeField writes it: in the current time zone (`zone`), UTC as `Z`."""
    if value is None:
        return None
    text = value.astimezone(zone).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


_JOINED = {"host_name": F("host__name"), "created_by_name": F("created_by__username")}
# One run, whole, as GET /runs/{id} answers it: one query (compiled once, labsite.compiled),
# the run's active leases joined to it, one row per lease (a single row with none).
_ONE_RUN = Compiled(
    lambda pk: (
        Run.objects.annotate(
            active=FilteredRelation("leases", condition=Q(leases__released_at__isnull=True))
        )
        .filter(pk=pk)
        .order_by("active__id")
        .values(
            *_PLAIN,
            *_TIMES,
            **_JOINED,
            command_text=F("command"),
            lease_index=F("active__gpu__index"),
            lease_uuid=F("active__gpu__uuid"),
        )
    ),
    arity=1,
)


def run_detail(pk: str) -> dict[str, Any] | None:
    """GET /runs/{id}: the run whole, or None."""
    rows = _ONE_RUN.raw(pk)
    if not rows:
        return None
    names = _ONE_RUN.names
    at, index, uuid = (names.index(n) for n in ("id", "lease_index", "lease_uuid"))
    leases = [(row[at], row[index], row[uuid]) for row in rows if row[uuid] is not None]
    return _shape(names, rows[:1], leases, summary=False)[0]


# The unfiltered page agents ask for (`GET /runs?limit=100`), compiled per (limit, offset,
# list command length): Django writes LIMIT and OFFSET into the SQL text. Its rows carry the
# run tally (the list's `count`), read in the same query.
_PAGES: dict[tuple[int, int, int], Compiled] = {}
_TALLY = RunTally.objects.filter(id=1).values("runs")[:1]


def _page_query(limit: int, offset: int, most: int) -> Compiled:
    key = (limit, offset, most)
    found = _PAGES.get(key)
    if found is None:
        if len(_PAGES) >= 64:
            _PAGES.clear()
        found = _PAGES[key] = Compiled(
            lambda: Run.objects.order_by("-created_at").values(
                *_PLAIN,
                *_TIMES,
                **_JOINED,
                command_head=Substr("command", 1, most),
                command_length=Length("command"),
                run_tally=Subquery(_TALLY),
            )[offset : offset + limit],
            arity=0,
        )
    return found


# The active leases of n runs, compiled per n. (A subquery of the page instead let PostgreSQL
# plan a semi join that read the page again for every lease: 4.3 ms for 100.)
_LEASES_OF: dict[int, Compiled] = {}


def _leases_of(ids: list[str]) -> list[tuple[Any, ...]]:
    query = _LEASES_OF.get(len(ids))
    if query is None:
        if len(_LEASES_OF) >= 64:
            _LEASES_OF.clear()
        query = _LEASES_OF[len(ids)] = Compiled(
            lambda *markers: (
                GpuLease.objects.filter(released_at__isnull=True, run_id__in=markers)
                .order_by("id")
                .values_list("run_id", "gpu__index", "gpu__uuid")
            ),
            arity=len(ids),
        )
    return query.raw(*ids)


def run_count() -> int:
    """How many runs there are (the unfiltered list's `count`): the tally, not a COUNT(*)."""
    found = RunTally.objects.filter(id=1).values_list("runs", flat=True).first()
    return int(found or 0)


def unfiltered_page(*, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    """`GET /runs?limit=&offset=` with no filter, newest first: (how many runs there are,
    what run_rows gives for that page), from queries compiled once."""
    page = _page_query(limit, offset, lab_limit("LIST_COMMAND_CHARS"))
    rows = page.raw()
    if not rows:
        return run_count(), []
    count = rows[0][page.names.index("run_tally")]
    at = page.names.index("id")
    leases = _leases_of([row[at] for row in rows])
    return int(count or 0), _shape(page.names, rows, leases, summary=True)


def run_rows(queryset: QuerySet[Run], *, summary: bool) -> list[dict[str, Any]]:
    """The runs of `queryset` (already filtered, ordered and sliced to a page) as API JSON:
    list rows with the head of each command (`summary`, as RunListSerializer), or whole."""
    most = lab_limit("LIST_COMMAND_CHARS")
    extra: dict[str, Any] = dict(_JOINED)
    if summary:
        extra |= {"command_head": Substr("command", 1, most), "command_length": Length("command")}
    else:
        extra["command_text"] = F("command")
    query = queryset.values(*_PLAIN, *_TIMES, **extra).query
    names = [*query.extra_select, *query.values_select, *query.annotation_select]
    try:
        sql, params = query.get_compiler(using=queryset.db).as_sql()
    except EmptyResultSet:  # a filter no run can match (`id__in=[]`): Django sends nothing
        return []
    rows = fetch_raw(sql, params, queryset.db)
    at = names.index("id")
    leases = _leases_of([row[at] for row in rows]) if rows else []
    return _shape(names, rows, leases, summary=summary)


def _json(text: Any) -> Any:
    """A JSON column as the driver gives it (text: PostgreSQL's jsonb through Django's loader,
    SQLite's own text), passed into the answer as it is stored, without decoding it. Both
    databases hold only valid JSON there (jsonb; JSONField's JSON_VALID check on SQLite)."""
    if text is None or not isinstance(text, str | bytes):
        return text
    return orjson.Fragment(text)


def _env(text: Any) -> Any:
    return redact_env(orjson.loads(text) if isinstance(text, str | bytes) else text)


def _sqlite_time(text: str) -> Any:
    # Django keeps an aware time in SQLite as its UTC wall time, "YYYY-MM-DD HH:MM:SS[.ffffff]".
    if len(text) in (19, 26) and text[10] == " ":
        return f"{text[:10]}T{text[11:]}Z"
    parsed = parse_datetime(text)
    assert parsed is not None, text
    return _time(parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed, UTC)


def _shape(
    names: list[str], rows: list[tuple[Any, ...]], lease_rows: list[Any], *, summary: bool
) -> list[dict[str, Any]]:
    """The API's JSON objects for `rows` (as the driver gives them, named by `names`): JSON
    columns passed through as stored, times as orjson writes them (the renderer's UTC `Z`, as
    DRF's field writes them) where the current time zone is UTC, the lease rows attached."""
    most = lab_limit("LIST_COMMAND_CHARS")
    zone = timezone.get_current_timezone()
    utc = zone.utcoffset(None) == timedelta(0)
    col = {name: i for i, name in enumerate(names)}
    id_at = col["id"]
    leases: dict[str, list[dict[str, Any]]] = {row[id_at]: [] for row in rows}
    for run_id, index, uuid in lease_rows:
        leases[run_id].append({"index": index, "uuid": uuid})
    source = {
        "command": "command_head" if summary else "command_text",
        "host": "host_name",
        "created_by": "created_by_name",
        "leased_gpus": "id",
    }
    # Each row's values in FIELDS' order in one C call, then the few that need converting.
    pick = itemgetter(*(col[source.get(name, name)] for name in FIELDS))
    times = _TimeOf(zone, utc)
    convert: list[tuple[str, Any]] = [("leased_gpus", leases.__getitem__), ("env", _env)]
    convert += [(name, _json) for name in FIELDS if name in _JSON and name != "env"]
    # One connection's times are all alike: `created_at` (never NULL) says which kind they are.
    if not rows or not (utc and _is_utc(rows[0][col["created_at"]])):
        convert += [(name, times) for name in _TIMES]
    length_at = col.get("command_length")
    out = []
    for row in rows:
        item = dict(zip(FIELDS, pick(row), strict=True))
        for key, how in convert:
            value = item[key]
            if value is not None:
                item[key] = how(value)
        if summary:
            item["command"] = item["command"][:most]
            item["command_truncated"] = row[length_at] > most
        out.append(item)
    return out


def _is_utc(value: Any) -> bool:
    return isinstance(value, datetime) and value.utcoffset() == timedelta(0)


class _TimeOf:
    """A time column's value as the API writes it."""

    __slots__ = ("utc", "zone")

    def __init__(self, zone: tzinfo, utc: bool) -> None:
        self.zone, self.utc = zone, utc

    def __call__(self, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            if self.utc:
                return _sqlite_time(value)
            parsed = parse_datetime(value)
            assert parsed is not None, value
            value = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed
        if self.utc and _is_utc(value):
            return value  # orjson writes it as DRF's field does: RFC 3339, UTC as Z
        return _time(value, self.zone)
