"""The batch sender and the commit both workers end their cycle with (streams/kafka/batches.py)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from budgetflow.streams.kafka.batches import commit_offsets, last_offset, send_in_batches


class Batch:
    def __init__(self, room: int) -> None:
        self.room = room
        self.records: list[tuple[bytes, bytes | None]] = []

    def append(self, *, key: bytes, value: bytes | None, timestamp: None) -> object | None:
        if len(key) + len(value or b"") > self.room - sum(len(k) + len(v or b"") for k, v in self.records):
            return None
        self.records.append((key, value))
        return object()


class Producer:
    """Batches of ``room`` bytes; the broker's log of one partition."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.log: list[tuple[str, int, list[tuple[bytes, bytes | None]]]] = []
        self.next_offset = 100

    def create_batch(self) -> Batch:
        return Batch(self.room)

    async def send_batch(self, batch: Batch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        self.log.append((topic, partition, batch.records))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(SimpleNamespace(offset=self.next_offset))
        self.next_offset += len(batch.records)
        return done


async def test_records_go_in_order_as_whole_batches_and_the_last_offset_counts_every_record() -> None:
    producer = Producer(room=10)
    records: list[tuple[bytes, bytes | None]] = [(b"k1", b"abc"), (b"k2", b"def"), (b"k3", None), (b"k4", b"x")]
    sent = await send_in_batches(producer, "state", 3, records)  # type: ignore[arg-type]
    assert [batch.records for batch in sent] == [2, 2]
    assert [records for _, _, records in producer.log] == [records[:2], records[2:]]
    assert {(topic, partition) for topic, partition, _ in producer.log} == {("state", 3)}
    assert await last_offset(sent) == 103


async def test_a_record_larger_than_a_batch_is_an_error_not_a_loop() -> None:
    with pytest.raises(ValueError, match="a record of 12 bytes for ledger does not fit"):
        await send_in_batches(Producer(room=10), "ledger", 0, [(b"k", b"x" * 11)])  # type: ignore[arg-type]


class Consumer:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.commits: list[dict[TopicPartition, int]] = []

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.error is not None:
            raise self.error
        self.commits.append(offsets)


async def test_a_failed_commit_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    offsets = {TopicPartition("ledger", 0): 5}
    ok = Consumer()
    await commit_offsets(ok, offsets, "replayed")  # type: ignore[arg-type]
    await commit_offsets(ok, {}, "replayed")  # type: ignore[arg-type]
    assert ok.commits == [offsets]
    with caplog.at_level(logging.WARNING):
        await commit_offsets(Consumer(CommitFailedError()), offsets, "the next owner replays these entries")  # type: ignore[arg-type]
    assert "commit failed (CommitFailedError); the next owner replays these entries" in caplog.text
