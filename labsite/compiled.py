"""Querysets compiled once per process and run again with new parameters.

Django's ORM spends most of a small query in Python: on a 2-core lab server, looking an API
token up with its user costs 2.8 ms through the ORM and 0.33 ms as the same SQL sent directly.
The reads agents repeat (every request's token, above all) take the ORM's SQL and its value
converters once, from the queryset itself, and reuse them: the rows are exactly the ORM's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from django.db import connections
from django.db.models import Model, QuerySet


class Marker(str):
    """A parameter's place in a compiled query (a value no caller passes)."""


class Compiled:
    """`build(*markers)` compiled once per database: `rows(*values)` runs it with the values in
    the markers' places and returns its rows, converted as the ORM converts them."""

    def __init__(self, build: Callable[..., QuerySet[Any]], arity: int) -> None:
        self.build = build
        self.markers = [Marker(f"\0labsite-param-{i}\0") for i in range(arity)]
        self._by_alias: dict[str, tuple[Any, str, tuple[Any, ...]]] = {}
        self.names: list[str] = []  # a values() queryset's names, in the order of its rows

    def compiler(self, alias: str) -> tuple[Any, str, tuple[Any, ...]]:
        found = self._by_alias.get(alias)
        if found is None:
            query = self.build(*self.markers).query
            self.names = [*query.extra_select, *query.values_select, *query.annotation_select]
            compiler = query.get_compiler(using=alias)
            sql, params = compiler.as_sql()
            found = self._by_alias[alias] = (compiler, sql, tuple(params))
        return found

    def dicts(self, *values: Any, alias: str = "default") -> list[dict[str, Any]]:
        """For a values() queryset: its rows as the dicts .values() gives."""
        rows = self.rows(*values, alias=alias)
        return [dict(zip(self.names, row, strict=True)) for row in rows]

    def rows(self, *values: Any, alias: str = "default") -> list[tuple[Any, ...]]:
        compiler, sql, params = self.compiler(alias)
        where: dict[str, Any] = dict(zip(self.markers, values, strict=True))
        # By equality: a field's own preparation may have turned a marker into a plain str.
        bound = [where.get(p, p) if isinstance(p, str) else p for p in params]
        with connections[alias].cursor() as cursor:
            cursor.execute(sql, bound)
            fetched = cursor.fetchall()
        return [tuple(row) for row in compiler.results_iter(results=[fetched])]

    def raw(self, *values: Any, alias: str = "default") -> list[tuple[Any, ...]]:
        """The rows as the database driver gives them, before the ORM's converters (for a
        reader that converts them itself: experiments.api.rows)."""
        _, sql, params = self.compiler(alias)
        where: dict[str, Any] = dict(zip(self.markers, values, strict=True))
        bound = [where.get(p, p) if isinstance(p, str) else p for p in params]
        return fetch_raw(sql, bound, alias)

    def instances(self, *values: Any, alias: str = "default") -> list[Model]:
        """For a queryset of models with select_related: the model instances, related ones
        attached, as iterating the queryset would give them."""
        compiler, _, _ = self.compiler(alias)
        info = compiler.klass_info
        out = []
        for row in self.rows(*values, alias=alias):
            obj = _instance(info, compiler.select, row, alias)
            assert obj is not None  # the queried model's own primary key is never NULL
            out.append(obj)
        return out


def _instance(
    info: dict[str, Any], select: Sequence[Any], row: tuple[Any, ...], alias: str
) -> Model | None:
    """The row's instance of info's model, its related ones attached; None for a related row
    that is not there (a nullable foreign key that is NULL), as Django's RelatedPopulator."""
    model = info["model"]
    indices = info["select_fields"]
    names = [select[i][0].target.attname for i in indices]
    values = [row[i] for i in indices]
    if values[names.index(model._meta.pk.attname)] is None:
        return None
    obj = model.from_db(alias, names, values)
    for related in info.get("related_klass_infos", []):
        child = _instance(related, select, row, alias)
        related["local_setter"](obj, child)
        if child is not None:
            related["remote_setter"](child, obj)
    return obj


def fetch_raw(sql: str, params: Sequence[Any], alias: str = "default") -> list[tuple[Any, ...]]:
    """`sql`'s rows as the driver gives them. On PostgreSQL, times are read by psycopg's own
    loader (C) instead of Django's, a Python subclass that took half of reading a page of 100
    runs: the same aware datetimes, in the session's time zone (UTC, as Django sets it)."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.cursor.adapters.register_loader("timestamptz", _timestamptz_loader())
        cursor.execute(sql, params)
        return cursor.fetchall()  # type: ignore[no-any-return]


def _timestamptz_loader() -> Any:
    from psycopg.types.datetime import TimestamptzLoader

    return TimestamptzLoader
