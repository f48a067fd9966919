"""The audit trail: every policy change and ledger adjustment, appended to ``budgetflow.audit``.

``budgetflow policy apply`` and ``budgetflow ledger adjust`` write here; ``budgetflow audit`` reads it back.
The topic keeps its records forever (``retention.ms=-1``) and nothing in budgetflow ever deletes or
compacts it.
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from orjson import dumps, loads
from pydantic import ValidationError

from budgetflow.schemas.events import AuditRecord
from budgetflow.schemas.settings import Settings
from budgetflow.streams.kafka.follow import read_topic

__all__ = ["default_actor", "read_audit", "send_audit"]


def default_actor() -> str:
    """``user@host`` of whoever runs the command (``--actor`` overrides it)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:256]


async def send_audit(producer: AIOKafkaProducer, topic: str, records: Iterable[AuditRecord]) -> None:
    """Queue records on a producer the caller flushes (with the change they describe)."""
    for record in records:
        await producer.send(topic, key=record.budget_id.encode(), value=dumps(record.model_dump(mode="json")))


async def read_audit(settings: Settings, topic: str, budget: str | None = None) -> list[AuditRecord]:
    """The trail in the order it was written, for one budget or all."""
    out = []
    for _, key, value, _ in sorted(await read_topic(settings, topic), key=lambda r: r[3]):
        if value is None or (budget is not None and key != budget.encode()):
            continue
        try:
            out.append(AuditRecord.model_validate(loads(value)))
        except (ValidationError, ValueError):
            continue  # not ours; the trail shows what it can read
    return out
