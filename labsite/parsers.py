"""The API's JSON parser: DRF's, with the lab's limits on size, depth, text and numbers."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from rest_framework import exceptions, parsers, status

from labsite.validation import JsonProblem, check_json, lab_limit


class BodyTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "the request body is too large"


def body_too_large() -> BodyTooLarge:
    most = lab_limit("MAX_BODY_BYTES")
    return BodyTooLarge(
        f"the request body is larger than this lab allows: at most {most} bytes "
        "(LABSITE_MAX_BODY_BYTES)"
    )


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # Python's json reads 1e309 as inf, which no column (and no JSON writer) can take.
        raise ValueError(f"the number {text[:30]} is out of range: numbers must be finite")
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON: numbers must be finite")


class JSONParser(parsers.JSONParser):
    """Reads at most MAX_BODY_BYTES, refuses NaN/Infinity and out-of-range floats, and checks
    depth, text and numbers of the document before any view sees it (LABSITE_MAX_JSON_DEPTH)."""

    def parse(
        self,
        stream: Any,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        most = lab_limit("MAX_BODY_BYTES")
        # Django checks DATA_UPLOAD_MAX_MEMORY_SIZE only on request.body; DRF reads the stream.
        raw = stream.read(most + 1)
        if len(raw) > most:
            raise body_too_large()
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise exceptions.ParseError(f"JSON parse error - the body is not {encoding}") from exc
        max_depth = lab_limit("MAX_JSON_DEPTH")
        try:
            document = json.loads(text, parse_float=_finite_float, parse_constant=_no_constants)
        except RecursionError as exc:
            raise exceptions.ParseError(
                f"JSON parse error - nested deeper than this lab allows: at most {max_depth} "
                "levels (LABSITE_MAX_JSON_DEPTH)"
            ) from exc
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from exc
        try:
            check_json(document, max_depth=max_depth)
        except JsonProblem as exc:
            raise exceptions.ValidationError({exc.path: [exc.message]}) from exc
        return document
