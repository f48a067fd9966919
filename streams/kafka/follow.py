"""Reading a topic from its beginning: to where it ends now, or on and on (the one way budgetflow does either).

Compacted topics (policies, statuses, heartbeats) are small pictures of "the latest value per key". A
:class:`Follower` reads them to their end now, says so (``caught_up``), then keeps reading what is appended,
handing every record to its ``absorb`` callback; a failed fetch (the broker is away) keeps the picture and tries
again after a backoff. :func:`read_records` reads once, to the end, for operator tools and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from budgetflow.schemas.settings import Settings
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.retry import Backoff
from budgetflow.streams.kafka.topics import topic_partitions

__all__ = ["Follower", "read_records", "read_topic"]

log = logging.getLogger(__name__)
Absorb = Callable[[ConsumerRecord], None]


async def _assign_from_beginning(
    consumer: AIOKafkaConsumer, settings: Settings, topics: Sequence[str]
) -> dict[TopicPartition, int]:
    """Assign every partition of ``topics``, seek to their beginning; where each one ends now."""
    partitions = [TopicPartition(t, p) for t in topics for p in await topic_partitions(settings, t)]
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    return dict(await consumer.end_offsets(partitions))


async def _still_behind(
    consumer: AIOKafkaConsumer, pending: set[TopicPartition], ends: dict[TopicPartition, int]
) -> None:
    for tp in list(pending):
        if await consumer.position(tp) >= ends[tp]:
            pending.discard(tp)


class Follower:
    """Follows ``topics`` from their beginning in a background task; ``caught_up`` is set once it has read them up
    to where they ended when it started."""

    def __init__(
        self,
        settings: Settings,
        topics: Sequence[str],
        absorb: Absorb,
        *,
        name: str,
        caught_up: asyncio.Event | None = None,
    ) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.absorb = absorb
        self.name = name
        self.caught_up = caught_up or asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and start following (returns at once; wait on ``caught_up`` for the picture)."""
        consumer = AIOKafkaConsumer(**client_options(self.settings.kafka), enable_auto_commit=False)
        try:
            await consumer.start()  # inside the try: a start that fails still closes the client
            ends = await _assign_from_beginning(consumer, self.settings, self.topics)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._follow(consumer, ends), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _follow(self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> None:
        pending = {tp for tp, end in ends.items() if end > 0}
        if not pending:
            self.caught_up.set()
        backoff = Backoff(first=1.0, cap=10.0)
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
            except Exception:  # the broker is away: keep the last picture, try again
                log.warning("%s could not fetch; retrying", self.name, exc_info=True)
                await backoff.wait()
                continue
            backoff.reset()
            for records in batch.values():
                for record in records:
                    self.absorb(record)
            if pending:
                await _still_behind(consumer, pending, ends)
                if not pending:
                    self.caught_up.set()


async def read_records(settings: Settings, topic: str, max_records: int = 50_000) -> list[ConsumerRecord]:
    """Every record of a topic from its beginning to its end now, as the consumer gave them (timestamps too)."""
    consumer = AIOKafkaConsumer(**client_options(settings.kafka), enable_auto_commit=False)
    try:
        await consumer.start()  # inside the try: a start that fails still closes the client
        ends = await _assign_from_beginning(consumer, settings, [topic])
        out: list[ConsumerRecord] = []
        pending = {tp for tp, end in ends.items() if end > 0}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=max_records)
            for records in batch.values():
                out.extend(records)
            await _still_behind(consumer, pending, ends)
        return out
    finally:
        await consumer.stop()


async def read_topic(settings: Settings, topic: str) -> list[tuple[int, bytes | None, bytes | None, int]]:
    """Every record of a topic from its beginning to its end now: (partition, key, value, offset)."""
    return [(r.partition, r.key, r.value, r.offset) for r in await read_records(settings, topic)]
