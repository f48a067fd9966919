"""The one JSON seam: orjson encodes and decodes, pydantic validates what it returns.

Decoding failures become :class:`InvalidEvent` with a short reason code and a
message naming the field, never echoing the content (it may be a prompt).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from budgetflow.schemas.errors import InvalidEvent

__all__ = [
    "REASONS",
    "decode",
    "decode_fast",
    "describe_validation_error",
    "dumps",
    "first_error",
    "loads",
    "validation_message",
]

M = TypeVar("M", bound=BaseModel)

# Reason codes are a bounded set: they become metric labels and DLQ headers.
REASONS = (
    "empty",
    "json",
    "not_object",
    "version",
    "usage_rule",
    "invalid",
    "out_of_range",
    "future",
    "unknown_budget",
    "too_large",
    "internal",
)
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_BOUNDS = frozenset({"less_than_equal", "greater_than_equal", "less_than", "greater_than"})


def dumps(value: BaseModel | dict[str, Any] | list[Any]) -> bytes:
    """JSON bytes of a model (USD as decimal strings, times as RFC 3339) or of plain data."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return orjson.dumps(value)


def loads(raw: bytes | str) -> Any:
    """Plain JSON decoding (NaN and Infinity are not JSON and are refused)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("json", f"not valid JSON ({exc.msg} at position {exc.pos})") from exc


def first_error(exc: ValidationError) -> tuple[tuple[int | str, ...], str, str]:
    """The first failure of a validation: its location, its message and " (and N more)" when there are more; no
    input value is included (it may be a secret or a prompt)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return tuple(errors[0]["loc"]), errors[0]["msg"].removeprefix("Value error, "), more


def validation_message(exc: ValidationError, *, top: str = "top level") -> str:
    """One line naming the first failing field (``budgets[2].id: ...``), without input values."""
    loc, message, more = first_error(exc)
    where = ""
    for part in loc:
        if isinstance(part, str) and not _FIELD.match(part):
            part = "<key>"  # a key of a mapping may be anything a caller wrote: it is not echoed  # noqa: PLW2901
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    return f"{where or top}: {message}{more}"


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """(reason code, one-line message naming the field) for an event that failed validation."""
    first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    if first["loc"][:1] == ("v",):
        reason = "version"
    elif first["msg"].removeprefix("Value error, ").startswith("usage rule"):
        reason = "usage_rule"
    elif first["type"] in _BOUNDS:
        reason = "out_of_range"
    else:
        reason = "invalid"
    return reason, validation_message(exc, top="event")


def decode(model: type[M], raw: bytes | None) -> tuple[M, tuple[str, ...]]:
    """Decode and validate one record value; unknown top-level fields are ignored and reported."""
    if raw is None or raw == b"":
        raise InvalidEvent("empty", "the record has no value")
    data = loads(raw)
    if not isinstance(data, dict):
        raise InvalidEvent("not_object", f"expected a JSON object, got {type(data).__name__}")
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        reason, message = describe_validation_error(exc)
        raise InvalidEvent(reason, message) from exc
    fields = model.model_fields
    unknown = tuple(sorted(key for key in data if key not in fields))
    return value, unknown


def decode_fast(model: type[M], raw: bytes | None) -> M:
    """Like :func:`decode` for budgetflow's own records (ledger entries): pydantic parses the JSON itself,
    which is faster, and unknown fields are not reported."""
    if raw is None or raw == b"":
        raise InvalidEvent("empty", "the record has no value")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors(include_url=False, include_input=False)):
            raise InvalidEvent("json", "not valid JSON") from exc
        reason, message = describe_validation_error(exc)
        raise InvalidEvent(reason, message) from exc
