"""`budgetflow kafka start/stop` runs a real broker whose data survives a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from budgetflow.schemas.settings import LocalKafkaSettings
from budgetflow.streams.localkafka import LocalKafka


async def _produce(bootstrap: str, topic: str, n: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 2, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    for i in range(n):
        await producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
    await producer.stop()  # flushes


async def _consume(bootstrap: str, topic: str, n: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(values) < n:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    values.extend(r.value for r in records)
    finally:
        await consumer.stop()
    return values


def test_data_survives_stop_and_start(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path, LocalKafkaSettings(port=0))
    try:
        first = broker.start()
        asyncio.run(_produce(first, "persisted", 500))
        assert broker.stop() is True
        assert broker.pid() is None
        second = broker.start()
        assert second == first, "a restarted broker keeps its address"
        values = asyncio.run(_consume(second, "persisted", 500))
        assert sorted(values) == sorted(f"v{i}".encode() for i in range(500))
    finally:
        broker.stop()


def test_stop_when_not_running_is_harmless(tmp_path: Path) -> None:
    assert LocalKafka(tmp_path).stop() is False
