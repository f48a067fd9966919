"""How a worker's cycle ends: its output sent as whole batches per partition, then its input offsets committed.

A stage sends what one cycle made for a partition with :func:`send_in_batches` (one producer and one partition
keep the order; the idempotent producer writes each batch once), waits until the broker has all of it, and only
then commits the offsets it consumed with :func:`commit_offsets`. A commit that fails is no error: a rebalance
took the partitions, their next owner reads the same records again, and each stage absorbs the redelivery
(docs/architecture.md, "Exactly once, and how it is proven").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

__all__ = ["SentBatch", "commit_offsets", "last_offset", "send_in_batches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SentBatch:
    """One producer batch handed to the producer: the broker's answer to come, and how many records it holds."""

    delivery: Awaitable[Any]  # resolves to the metadata of the batch's first record
    records: int


async def send_in_batches(
    producer: AIOKafkaProducer, topic: str, partition: int, records: Sequence[tuple[bytes, bytes | None]]
) -> list[SentBatch]:
    """Send ``(key, value)`` records to one partition, in their order, as whole producer batches.

    Returns once every batch is handed to the producer; the broker has them when each ``delivery`` resolves
    (:func:`last_offset` waits for all). A value of ``None`` is a tombstone.
    """
    sent: list[SentBatch] = []
    index = 0
    while index < len(records):
        batch = producer.create_batch()
        start = index
        while index < len(records):
            key, value = records[index]
            if batch.append(key=key, value=value, timestamp=None) is None:
                break  # the batch is full
            index += 1
        if index == start:
            key, value = records[index]
            size = len(key) + len(value or b"")
            raise ValueError(f"a record of {size} bytes for {topic} does not fit in a producer batch")
        sent.append(SentBatch(await producer.send_batch(batch, topic, partition=partition), index - start))
    return sent


async def last_offset(sent: Sequence[SentBatch]) -> int:
    """Wait until the broker has every batch; the offset of the last record written (``sent`` is not empty)."""
    metadata = await asyncio.gather(*(batch.delivery for batch in sent))
    return max(int(meta.offset) + batch.records - 1 for meta, batch in zip(metadata, sent, strict=True))


async def commit_offsets(consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int], then: str) -> None:
    """Commit the next offsets to read (nothing when there are none).

    A failed commit is logged, with ``then`` saying what follows for the stage, and not raised: the partitions
    moved to another member of the group (or the broker refused), and their next owner replays from the last
    commit.
    """
    if not offsets:
        return
    try:
        await consumer.commit(dict(offsets))
    except (CommitFailedError, KafkaError) as exc:
        log.warning("commit failed (%s); %s", exc.__class__.__name__, then)
