"""Dead letters: a record that fails a stage goes to the DLQ with its reason; the stream goes on.

Prompt text never reaches the DLQ unless ``dlq.keep_raw`` is set: each message
string of a request is replaced by its length and SHA-256, and a record that is
not even JSON is replaced whole. Headers carry the stage, the reason code, a
one-line message (which never echoes content) and where the record came from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.serde import dumps, loads

__all__ = ["DeadLetter", "redact_request"]

_TEXT_FIELDS = ("content", "text", "arguments", "prompt", "name", "input", "output")


def _digest(text: str) -> dict[str, Any]:
    raw = text.encode("utf-8", "surrogatepass")
    return {"redacted": True, "length": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def _redact(value: Any, depth: int = 0) -> Any:
    if depth > 64:
        return {"redacted": True, "reason": "too deep"}
    if isinstance(value, str):
        return _digest(value)
    if isinstance(value, list):
        return [_redact(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _redact_field(k, v, depth + 1) for k, v in value.items()}
    return value


def _redact_field(key: str, value: Any, depth: int) -> Any:
    if key in _TEXT_FIELDS or key in ("messages", "tools", "tool_calls", "function", "parameters"):
        return _redact(value, depth)
    if isinstance(value, (dict, list)):
        return _redact(value, depth)
    return value


def redact_request(raw: bytes | None) -> bytes:
    """A request record with every piece of prompt text replaced by its length and SHA-256."""
    if raw is None:
        return b"null"
    try:
        data = loads(raw)
    except InvalidEvent:
        return dumps({"redacted": True, "length": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
    if isinstance(data, dict):
        redacted = {}
        for key, value in data.items():
            if key in ("messages", "prompt", "tools"):
                redacted[key] = _redact(value)
            elif isinstance(value, str) and len(value) > 256:
                redacted[key] = _digest(value)  # an oversized field may be text put anywhere
            elif isinstance(value, (dict, list)):
                redacted[key] = _redact(value)
            else:
                redacted[key] = value
        return dumps(redacted)
    return dumps({"redacted": True, "length": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})


@dataclass(frozen=True)
class DeadLetter:
    """One record for the DLQ."""

    stage: str
    reason: str
    message: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("budgetflow.stage", self.stage.encode()),
            ("budgetflow.reason", self.reason.encode()),
            ("budgetflow.error", self.message[:1000].encode()),
            ("budgetflow.source.topic", self.topic.encode()),
            ("budgetflow.source.partition", str(self.partition).encode()),
            ("budgetflow.source.offset", str(self.offset).encode()),
        ]
