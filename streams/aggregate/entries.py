"""One ledger record on the aggregate: decoded and applied to its partition's ledger, or dead-lettered.

A record that is not a valid entry, an entry the ledger refuses (too late, or past the bound of a period) and an
entry the ledger fails on go to the DLQ with their reason, and the partition goes on. Every result is counted by
entry kind (handed to Prometheus once per cycle, not once per entry).
"""

from __future__ import annotations

import logging

from aiokafka import ConsumerRecord, TopicPartition

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import LedgerEntry
from budgetflow.schemas.serde import decode_fast
from budgetflow.schemas.settings import Settings
from budgetflow.streams.aggregate.ledger import ApplyResult, PartitionLedger
from budgetflow.streams.kafka.dlq import DeadLetter
from budgetflow.streams.rules.clock import Clock
from budgetflow.streams.service.metrics import PipelineMetrics

__all__ = ["EntryApplier"]

log = logging.getLogger(__name__)

_LATE_MESSAGES = {
    "late_period": "the entry's period is closed (past its grace)",
    "late_horizon": "the entry's request is past its TTL and the dedupe horizon",
}
_OUT_OF_RANGE = "the entry would take its budget's month past the bound of a period (MAX_PERIOD_PICO)"


class EntryApplier:
    """Applies ledger records to their partition's ledger and counts what became of them."""

    def __init__(self, settings: Settings, clock: Clock, metrics: PipelineMetrics) -> None:
        self.clock = clock
        self.max_clock_skew_s = settings.max_clock_skew_s
        self.keep_raw = settings.dlq.keep_raw
        self.metrics = metrics
        self._results: dict[tuple[str, str], int] = {}  # (entry kind, result): entries, since the last count()

    def apply(
        self, ledger: PartitionLedger, tp: TopicPartition, record: ConsumerRecord
    ) -> tuple[ApplyResult | None, DeadLetter | None]:
        """The ledger's result for one record (None if it never reached the ledger), and its dead letter if any."""
        try:
            entry = decode_fast(LedgerEntry, record.value)
        except InvalidEvent as exc:
            return None, self._dead_letter(tp, record, exc.reason, str(exc))
        max_time = self.clock.tick_bound(record.timestamp, self.max_clock_skew_s)
        try:
            result = ledger.apply(entry, record.offset, max_time=max_time)
        except Exception as exc:  # a defect must not stop the partition on one record
            log.exception(
                "ledger failed on %s[%d]@%d; dead-lettered as internal", tp.topic, tp.partition, record.offset
            )
            return None, self._dead_letter(tp, record, "internal", f"the ledger failed: {exc.__class__.__name__}")
        key = (entry.kind, result)
        self._results[key] = self._results.get(key, 0) + 1
        if result in _LATE_MESSAGES:
            self.metrics.late.labels(result.removeprefix("late_")).inc()
            return result, self._dead_letter(tp, record, "late", _LATE_MESSAGES[result])
        if result == "out_of_range":
            return result, self._dead_letter(tp, record, "out_of_range", _OUT_OF_RANGE)
        return result, None

    def count(self, dead: list[DeadLetter]) -> None:
        """Hand a cycle's counts to Prometheus: the ledger's results by entry kind, and the dead letters."""
        for (kind, result), entries in self._results.items():
            self.metrics.ledger_entries.labels(kind, result).inc(entries)
        self._results.clear()
        for letter in dead:
            self.metrics.dead_letters.labels("aggregate", letter.reason).inc()

    def _dead_letter(self, tp: TopicPartition, record: ConsumerRecord, reason: str, message: str) -> DeadLetter:
        return DeadLetter.of_record(
            "aggregate",
            reason,
            message,
            tp.topic,
            tp.partition,
            record.offset,
            record.key,
            record.value,
            keep_raw=self.keep_raw,
        )
