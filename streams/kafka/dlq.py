"""Dead letters: a record that fails a stage goes to the DLQ with its reason; the stream goes on.

Prompt text never reaches the DLQ unless ``dlq.keep_raw`` is set. Redaction
keeps a list of fields known to hold no text of a user's (ids, times, model
names, token counts, amounts) and replaces everything else: every string in
any other field, at any depth, becomes its length and SHA-256, and a record
that is not even a JSON object is replaced whole. A dead letter always fits
in one produce request: a value past :data:`MAX_VALUE_BYTES` (or a key past
:data:`MAX_KEY_BYTES`) is cut to its length and digest. Headers carry the
stage, the reason code, a one-line message (which never echoes content) and
where the record came from.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.serde import dumps, loads

__all__ = ["MAX_KEY_BYTES", "MAX_VALUE_BYTES", "DeadLetter", "redact", "send_dead_letter"]

log = logging.getLogger(__name__)

# Far below a produce request's 1 MiB, headers included: a dead letter can always be written.
MAX_VALUE_BYTES = 64 * 1024
MAX_KEY_BYTES = 1024

# Fields of the wire events (requests, usage, ledger entries) that hold no user text: kept as they are, as long
# as they are scalars or lists of scalars and their strings look like identifiers (no spaces, no more than 256
# characters): a prompt put in a safe field is digested all the same. Anything else is redacted.
_SAFE_FIELDS = frozenset(
    {
        "v",
        "request_id",
        "attempt",
        "occurred_at",
        "request_occurred_at",
        "usage_at",
        "budgets",
        "budget_id",
        "model",
        "request_model",
        "provider",
        "backend",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "input_bytes",
        "outcome",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_input_tokens",
        "output_tokens",
        "reasoning_tokens",
        "reported_cost_usd",
        "entry_id",
        "kind",
        "period",
        "amount_pico_usd",
        "tier",
        "priced",
        "price_version",
        "ttl_s",
        "expire",
    }
)
_LABELS = "metadata"  # gateway labels: kept when keys and values look like labels
_TOKEN = re.compile(r"^[A-Za-z0-9:._/@+#=-]{0,256}$")
_LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_SHOWN_KEY = re.compile(r"^[a-z_]{1,32}$")
# Only these say something about the record itself; any other error (authorization, a timeout, a closed
# producer) is the deployment's, and must not be taken for a refusal of this one letter.
_REFUSED = frozenset(
    {
        "MessageSizeTooLargeError",
        "RecordTooLargeError",
        "RecordListTooLargeError",
        "InvalidMessageError",
        "CorruptRecordException",
    }
)


def _digest(raw: bytes) -> dict[str, Any]:
    return {"redacted": True, "length": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def _redact(value: Any, depth: int = 0) -> Any:
    """Every string at any depth replaced by its digest; numbers, booleans and nulls kept."""
    if depth > 64:
        return {"redacted": True, "reason": "too deep"}
    if isinstance(value, str):
        return _digest(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return [_redact(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {_safe_key(k): _redact(v, depth + 1) for k, v in value.items()}
    return value


def _safe_key(key: str) -> str:
    # Keys are shown (they say where text was) only when they look like field names: a key could be text itself.
    if _SHOWN_KEY.match(key) or key in _SAFE_FIELDS:
        return key
    return f"redacted-key-{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


def _short(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_TOKEN.match(value))
    return value is None or isinstance(value, (bool, int, float))


def _label_key(key: Any) -> str:
    return key if isinstance(key, str) and _LABEL_KEY.match(key) else _safe_key(str(key))


def _redact_field(key: str, value: Any) -> Any:
    if key in _SAFE_FIELDS and (_short(value) or (isinstance(value, list) and all(_short(v) for v in value))):
        return value
    if key == _LABELS and isinstance(value, dict):
        return {_label_key(k): (v if _short(v) else _redact(v)) for k, v in value.items()}
    return _redact(value)


def redact(raw: bytes | None) -> bytes:
    """A record with everything but the known-safe fields redacted (strings replaced by length and SHA-256)."""
    if raw is None:
        return b"null"
    try:
        data = loads(raw)
    except InvalidEvent:
        return dumps(_digest(raw))
    if not isinstance(data, dict):
        return dumps(_digest(raw))
    return dumps({_safe_key(k): _redact_field(k, v) for k, v in data.items()})


def _fit_value(value: bytes) -> bytes:
    if len(value) <= MAX_VALUE_BYTES:
        return value
    return dumps({**_digest(value), "reason": "too_large"})


def _fit_key(key: bytes | None) -> bytes | None:
    if key is None or len(key) <= MAX_KEY_BYTES:
        return key
    return b"sha256:" + hashlib.sha256(key).hexdigest().encode()


@dataclass(frozen=True)
class DeadLetter:
    """One record for the DLQ: key and value are cut to fit when they are too large (see the module docstring)."""

    stage: str
    reason: str
    message: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", _fit_key(self.key))
        object.__setattr__(self, "value", _fit_value(self.value))

    @classmethod
    def of_record(
        cls,
        stage: str,
        reason: str,
        message: str,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        *,
        keep_raw: bool,
    ) -> DeadLetter:
        """The dead letter of a record as read: redacted unless ``keep_raw`` (``dlq.keep_raw``)."""
        stored = value if keep_raw else redact(value)
        return cls(stage, reason, message, topic, partition, offset, key, stored or b"null")

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("budgetflow.stage", self.stage.encode()),
            ("budgetflow.reason", self.reason.encode()),
            ("budgetflow.error", self.message[:1000].encode("utf-8", "replace")),
            ("budgetflow.source.topic", self.topic.encode()),
            ("budgetflow.source.partition", str(self.partition).encode()),
            ("budgetflow.source.offset", str(self.offset).encode()),
        ]


async def send_dead_letter(producer: Any, topic: str, letter: DeadLetter) -> Awaitable[Any]:
    """Send a dead letter; the future it returns never fails for a reason of this one record.

    A broker that is away fails the future as usual (the batch is redone after a restart). A record the broker
    refuses for itself (too large, invalid) is replaced by its digest; if even that is refused, it is logged and
    dropped, so one record can never put a worker into a restart loop.
    """
    from aiokafka.errors import KafkaError

    async def sent(future: Awaitable[Any]) -> Any:
        try:
            return await future
        except KafkaError as exc:
            if not _refused(exc):
                raise
            return await _fallback(producer, topic, letter, exc)

    try:
        future = await producer.send(topic, key=letter.key, value=letter.value, headers=letter.headers())
    except KafkaError as exc:
        if not _refused(exc):
            raise
        return _done(await _fallback(producer, topic, letter, exc))
    return sent(future)


async def _fallback(producer: Any, topic: str, letter: DeadLetter, exc: Exception) -> Any:
    from aiokafka.errors import KafkaError

    log.error(
        "dead letter of %s[%d]@%d refused by the broker (%s); writing its digest instead",
        letter.topic,
        letter.partition,
        letter.offset,
        exc.__class__.__name__,
    )
    small = DeadLetter(
        letter.stage,
        letter.reason,
        letter.message,
        letter.topic,
        letter.partition,
        letter.offset,
        _fit_key(letter.key and letter.key[:64]),
        dumps(_digest(letter.value)),
    )
    try:
        return await (await producer.send(topic, key=small.key, value=small.value, headers=small.headers()))
    except KafkaError as again:
        if not _refused(again):
            raise
        log.error(
            "dead letter of %s[%d]@%d dropped (%s)",
            letter.topic,
            letter.partition,
            letter.offset,
            again.__class__.__name__,
        )
        return None


def _refused(exc: Exception) -> bool:
    return exc.__class__.__name__ in _REFUSED


async def _done(value: Any) -> Any:
    return value
