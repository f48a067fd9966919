"""Time through the stream: every ``HEARTBEAT_S`` the aggregate writes a tick into each ledger partition it owns.

A tick moves its partition's stream time, expires reservations past their TTL, rolls the month over and triggers
the partition's heartbeat (docs/architecture.md, "Time through the stream"). Whether a tick expires anything is
decided when it is written, so that a replay decides alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from budgetflow.schemas.events import LedgerEntry
from budgetflow.schemas.periods import period_of
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import Settings
from budgetflow.streams.aggregate.ledger import PartitionLedger
from budgetflow.streams.rules.clock import Clock

__all__ = ["Ticker"]

log = logging.getLogger(__name__)


def _tick_entry(partition: int, now: datetime, *, expire: bool) -> LedgerEntry:
    """The tick for one partition at ``now``."""
    return LedgerEntry(
        entry_id=f"tick:{partition}:{now.timestamp():.6f}",
        kind="tick",
        request_id="tick",
        period=period_of(now),
        amount_pico_usd=0,
        occurred_at=now,
        expire=expire,
    )


class Ticker:
    """Writes the ticks of the partitions in ``ledgers`` (the worker's own mapping, read at each round)."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        topic: str,
        ledgers: Mapping[int, PartitionLedger],
        producer: AIOKafkaProducer,
        consumer: AIOKafkaConsumer,
    ) -> None:
        self.every_s = settings.heartbeat_s
        self.max_backlog = settings.worker.expiry_max_lag_records
        self.clock = clock
        self.topic = topic
        self.ledgers = ledgers
        self.producer = producer
        self.consumer = consumer

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.every_s)
            now = self.clock.now()
            for p in list(self.ledgers):
                tick = _tick_entry(p, now, expire=self._may_expire(p))
                try:
                    await self.producer.send(self.topic, key=b"tick", value=dumps(tick), partition=p)
                except KafkaError as exc:
                    log.warning("tick for partition %d not sent (%s)", p, exc.__class__.__name__)

    def _may_expire(self, partition: int) -> bool:
        """Expire only while the backlog is small, so that usage sitting in it is not pre-empted."""
        highwater = self.consumer.highwater(TopicPartition(self.topic, partition))
        ledger = self.ledgers.get(partition)
        applied = ledger.meta.applied if ledger is not None else -1
        backlog = None if highwater is None else highwater - applied - 1
        return backlog is not None and backlog <= self.max_backlog
