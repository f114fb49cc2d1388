"""Checks at the edge, shared by every entry point: JSON the database can store, lab limits.

PostgreSQL refuses NUL in text and jsonb, UTF-8 cannot carry lone surrogates, and its integer
columns stop at 2**31 - 1. Letting such a value reach the database answers a 500, and the
error's context (DETAIL / CONTEXT lines) carries the row's values into the server log, secrets
included. So requests are checked here first, with a 400 that names the field and never
echoes the value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from rest_framework import serializers
from rest_framework.settings import api_settings

# PositiveIntegerField and IntegerField are 32-bit signed columns on PostgreSQL.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")
_MAX_PATH = 80


def lab_limit(name: str) -> int:
    """One of the lab's limits (settings.LABSITE[name], set by LABSITE_<name>)."""
    value = settings.LABSITE[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImproperlyConfigured(f"LABSITE_{name} must be an integer")
    return value


def check_size(
    field: str, size: int, name: str, unit: str, *, most: int | None = None, verb: str = "is"
) -> None:
    """A 400 (Django's ValidationError) naming the lab's limit `name` when size passes it
    (`most` instead where a column is shorter than the lab's limit)."""
    most = lab_limit(name) if most is None else most
    if size > most:
        raise ValidationError(
            {field: f"{verb} {size} {unit}; this lab allows at most {most} (LABSITE_{name})"}
        )


def json_size(value: Any) -> int:
    """The bytes `value` takes as compact JSON (as the API sends it back)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def check_int(field: str, value: int | None, *, minimum: int, maximum: int = INT32_MAX) -> None:
    """A 400 (Django's ValidationError) unless value is None or an integer in range."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValidationError({field: f"must be an integer from {minimum} to {maximum}"})


def text_problem(value: str) -> str | None:
    """Why the database cannot store this text, or None (the value itself is never shown)."""
    match = _BAD_TEXT.search(value)
    if match is None:
        return None
    if match.group() == "\x00":
        return "text may not contain NUL (\\u0000) characters"
    return "text may not contain lone surrogates (\\ud800-\\udfff); send valid UTF-8"


def _label(path: str) -> str:
    return (path or "body")[:_MAX_PATH]


class JsonProblem(ValueError):
    """Where a JSON document breaks a rule, and which rule (never the offending value)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{_label(path)}: {message}")
        self.path = _label(path)
        self.message = message


def check_json(document: Any, *, max_depth: int) -> None:
    """Depth, text and numbers of a parsed JSON document, walked without recursion.

    Raises JsonProblem for: containers nested deeper than max_depth, strings or keys with NUL
    or lone surrogates, and numbers that are not finite.
    """
    stack: list[tuple[Any, str, int]] = [(document, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, Mapping | list) and depth > max_depth:
            raise JsonProblem(
                path,
                f"nested deeper than {max_depth} levels; this lab allows at most {max_depth} "
                "(LABSITE_MAX_JSON_DEPTH)",
            )
        if isinstance(node, Mapping):
            for key, value in node.items():
                problem = text_problem(key) if isinstance(key, str) else None
                if problem:
                    raise JsonProblem(path, f"a key: {problem}")
                stack.append((value, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]", depth + 1) for i, value in enumerate(node))
        elif isinstance(node, str):
            problem = text_problem(node)
            if problem:
                raise JsonProblem(path, problem)
        elif isinstance(node, float) and not math.isfinite(node):
            raise JsonProblem(path, "numbers must be finite (no NaN or Infinity)")


class RejectUnknownFieldsMixin:
    """Input serializers refuse keys they do not know: a misspelt or read-only field (`status`,
    `created_by`) silently ignored would let a caller believe it took effect."""

    fields: Any

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            allowed = sorted(name for name, field in self.fields.items() if not field.read_only)
            unknown = sorted(str(key)[:50] for key in data if key not in allowed)
            if unknown:
                shown = ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else "")
                raise serializers.ValidationError(
                    {
                        api_settings.NON_FIELD_ERRORS_KEY: [
                            f"unknown field(s): {shown}; allowed: {', '.join(allowed)}"
                        ],
                        **{key: ["unknown field"] for key in unknown[:10]},
                    }
                )
            # DRF's CharField turns 0 into "0": a number where text belongs is a client's bug.
            wrong = {
                name: ["must be a string"]
                for name, field in self.fields.items()
                if isinstance(field, serializers.CharField)
                and not field.read_only
                and name in data
                and data[name] is not None
                and not isinstance(data[name], str)
            }
            if wrong:
                raise serializers.ValidationError(wrong)
        return super().to_internal_value(data)  # type: ignore[misc]


class InputSerializer(RejectUnknownFieldsMixin, serializers.Serializer):  # type: ignore[misc]
    """Base of every request body shape: unknown keys are a 400 listing the allowed ones."""


class ModelInputSerializer(RejectUnknownFieldsMixin, serializers.ModelSerializer):  # type: ignore[misc]
    """InputSerializer for bodies that map onto one model's fields."""
