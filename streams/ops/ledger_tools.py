"""Operator tools on the ledger: adjustments (credits and debits) and reports.

An adjustment is a ledger entry of kind ``adjust`` with a request id of its own (``adjust:<id>``), written to
the budget's ledger partition like any entry enrich writes: the aggregate counts it once per id (the same
dedupe as every request), it moves the budget's spend and status, and it stays in the ledger as the record.
Its ``occurred_at`` is when it was made, so it is never late while its period is open; its ``period`` is the
month it counts in.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.events import AuditRecord, LedgerEntry, entry_id, period_of
from budgetflow.schemas.money import MAX_ENTRY_PICO, format_usd, parse_usd, usd_string
from budgetflow.schemas.periods import next_month_start
from budgetflow.schemas.serde import dumps, validation_message
from budgetflow.schemas.settings import DefaultPolicySettings, Settings
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.records import RequestState
from budgetflow.streams.aggregate.store import MemoryStore
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.follow import read_records
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now, partition_for
from budgetflow.streams.ops.audit import send_audit
from budgetflow.streams.rules.clock import Clock
from budgetflow.streams.rules.policies import default_policy

__all__ = ["ReportRow", "adjust", "adjustment_entry", "render_report", "replay_report", "report"]


def adjustment_entry(budget: str, usd: str, *, period: str, adjust_id: str, now: datetime, grace_s: int) -> LedgerEntry:
    """The ledger entry of an adjustment, or a ConfigError naming what is wrong."""
    try:
        amount = parse_usd(usd, what="USD")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if amount == 0:
        raise ConfigError("USD: an adjustment of 0 changes nothing")
    if abs(amount) > MAX_ENTRY_PICO:
        raise ConfigError(f"USD: at most {format_usd(MAX_ENTRY_PICO, 2)} either way in one adjustment (make several)")
    request_id = f"adjust:{adjust_id}"
    try:
        entry = LedgerEntry(
            entry_id=entry_id(request_id, 0, "adjust", budget),
            budget_id=budget,
            request_id=request_id,
            kind="adjust",
            period=period,
            amount_pico_usd=amount,
            occurred_at=now,
            priced=True,
            tier="exact",
        )
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, top="adjustment")) from exc
    if period > period_of(now):
        raise ConfigError(f"--period {period} has not begun (it is {period_of(now)})")
    if next_month_start(period).timestamp() + grace_s < now.timestamp():
        raise ConfigError(f"--period {period} is closed (past PERIOD_GRACE_S); it can no longer change")
    return entry


async def adjust(
    settings: Settings,
    budget: str,
    usd: str,
    *,
    period: str,
    reason: str,
    adjust_id: str | None,
    actor: str,
    now: datetime,
) -> LedgerEntry:
    """Write an adjustment to the ledger and its record to the audit trail; return the entry."""
    if not reason.strip():
        raise ConfigError("--reason: say why")
    entry = adjustment_entry(
        budget, usd, period=period, adjust_id=adjust_id or uuid.uuid4().hex, now=now, grace_s=settings.period_grace_s
    )
    topics = Topics.from_settings(settings)
    await ensure_topics_now(settings, topics)
    assert entry.budget_id is not None
    record = AuditRecord(
        kind="adjust",
        budget_id=entry.budget_id,
        at=now,
        actor=actor,
        principal=settings.kafka.security.sasl_username,
        period=period,
        amount_usd=entry.amount_pico_usd,
        reason=reason,
        entry_id=entry.entry_id,
    )
    producer = AIOKafkaProducer(**client_options(settings.kafka), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        # Keyed by budget id, so it lands on the partition that holds the budget's state.
        await producer.send(
            topics.ledger.name,
            key=entry.budget_id.encode(),
            value=dumps(entry.model_dump(mode="json", exclude_none=True)),
            partition=partition_for(entry.budget_id, topics.ledger.partitions),
        )
        await send_audit(producer, topics.audit.name, [record])
        await producer.flush()
    finally:
        await producer.stop()
    return entry


# -- reports ------------------------------------------------------------------------------------------------------
ADJUSTMENT = "(adjustment)"


@dataclass
class ReportRow:
    """Spend of one budget in one period for one model, provider, backend and tier."""

    budget: str
    period: str
    model: str
    provider: str
    backend: str
    tier: str
    requests: int = 0
    settled: int = 0
    reserved: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "period": self.period,
            "model": self.model,
            "provider": self.provider,
            "backend": self.backend,
            "tier": self.tier,
            "requests": self.requests,
            "settled_usd": usd_string(self.settled),
            "reserved_usd": usd_string(self.reserved),
        }


def replay_report(
    records: Iterable[tuple[int, bytes | None, int, float | None]],
    config: LedgerConfig,
    defaults: DefaultPolicySettings,
) -> tuple[list[ReportRow], int]:
    """Replay ledger records (partition, value, offset, bound of a tick's time) through the aggregate's own rules.

    Each change of a request's state is attributed to the model, provider, backend and tier its entries named,
    so the rows of a (budget, period) add up to exactly what the aggregate holds for it. Returns the rows and
    the number of records that are not ledger entries (the aggregate sent those to the DLQ).
    """
    by_partition: dict[int, list[tuple[int, bytes | None, float | None]]] = {}
    for partition, value, offset, max_time in records:
        by_partition.setdefault(partition, []).append((offset, value, max_time))
    rows: dict[tuple[str, ...], ReportRow] = {}
    attrs: dict[tuple[str, str, int], tuple[str, str, str, str]] = {}
    skipped = 0

    def observe(before: RequestState | None, after: RequestState) -> None:
        model, provider, backend, tier = attrs[after.key]
        key = (after.budget, after.period, model, provider, backend, tier)
        row = rows.get(key)
        if row is None:
            row = rows[key] = ReportRow(*key)
        row.settled += after.settled_part - (before.settled_part if before else 0)
        row.reserved += after.reserved_part - (before.reserved_part if before else 0)
        row.requests += before is None

    for partition, items in sorted(by_partition.items()):
        store = MemoryStore()
        ledger = PartitionLedger(partition, store, config, lambda b: default_policy(b, defaults))
        ledger.observer = observe
        for n, (offset, value, max_time) in enumerate(sorted(items, key=lambda item: item[0]), start=1):
            try:
                entry = LedgerEntry.model_validate_json(value or b"")
            except ValidationError:
                skipped += 1
                continue
            if entry.budget_id is not None:
                if entry.kind == "adjust":
                    named = (ADJUSTMENT, "-", "-", "-")
                else:
                    named = (entry.model, entry.provider, entry.backend, entry.tier)
                attrs.setdefault((entry.budget_id, entry.request_id, entry.attempt), named)
            ledger.apply(entry, offset, max_time=max_time)
            if n % 5_000 == 0:  # batches, as the aggregate writes them
                store.write(dict(ledger.drain()), offset)
        store.write(dict(ledger.drain()), -1)
    ordered = sorted(rows.values(), key=lambda r: (r.period, r.budget, r.model, r.provider, r.backend, r.tier))
    return [r for r in ordered if r.requests or r.settled or r.reserved], skipped


async def report(settings: Settings, period: str | None = None) -> tuple[list[ReportRow], int]:
    """The report of a period (or every period) from a replay of the whole ledger topic."""
    topics = Topics.from_settings(settings)
    clock = Clock(settings.clock)
    records = [
        (r.partition, r.value, r.offset, clock.tick_bound(r.timestamp, settings.max_clock_skew_s))
        for r in await read_records(settings, topics.ledger.name)
    ]
    rows, skipped = replay_report(records, LedgerConfig.from_settings(settings), settings.default_policy)
    return [r for r in rows if period is None or r.period == period], skipped


def render_report(rows: list[ReportRow], fmt: str) -> str:
    """CSV (with a header) or JSON (a list of objects): amounts as exact decimal USD strings."""
    dicts = [row.as_dict() for row in rows]
    if fmt == "json":
        return dumps(dicts).decode() + "\n"
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=[*list(ReportRow.__dataclass_fields__)[:7], "settled_usd", "reserved_usd"], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(dicts)
    return out.getvalue()
