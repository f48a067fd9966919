"""The harness itself works end to end against the real broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

TopicFactory = Callable[..., Awaitable[str]]


async def _read_all(
    consumer: AIOKafkaConsumer, expected: int, timeout_s: float = 20.0
) -> list[tuple[bytes, bytes | None]]:
    """Every record from the beginning until `expected` are read or the end is reached."""
    out: list[tuple[bytes, bytes | None]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = await consumer.getmany(timeout_ms=500)
        for records in batch.values():
            out.extend((r.key, r.value) for r in records)
        if len(out) >= expected and not batch:
            break
    return out


async def test_compacted_topic_keeps_the_latest_value_per_key(
    topic_factory: TopicFactory, producer_factory, consumer_factory
) -> None:
    # Small segments and an eager cleaner, so the test sees compaction happen:
    # the cleaner never touches the active segment, hence the roll below.
    topic = await topic_factory(
        "compacted",
        config={
            "cleanup.policy": "compact",
            "segment.ms": "100",
            "min.cleanable.dirty.ratio": "0.001",
            "delete.retention.ms": "100",
            "min.compaction.lag.ms": "0",
        },
    )
    producer: AIOKafkaProducer = await producer_factory()
    keys = [f"budget-{i}".encode() for i in range(20)]
    for round_ in range(5):
        for key in keys:
            await producer.send(topic, key=key, value=f"v{round_}".encode())
        await producer.flush()
        await asyncio.sleep(0.2)  # each round lands in a segment of its own
    await producer.send_and_wait(topic, key=keys[0], value=None)  # a tombstone deletes budget-0
    await asyncio.sleep(0.2)
    # Compaction removes old values eventually; poll until it has.
    deadline = time.monotonic() + 60
    while True:
        await producer.send_and_wait(topic, key=b"roll", value=b"x")  # rolls the active segment
        consumer = await consumer_factory(topic)
        records = await _read_all(consumer, expected=1)
        await consumer.stop()
        survivors = [(k, v) for k, v in records if k != b"roll"]
        latest: dict[bytes, bytes | None] = {}
        for key, value in survivors:
            latest[key] = value
        compacted = len(survivors) <= len(keys)
        if compacted or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    assert compacted, f"{len(survivors)} records survive; compaction never ran"
    assert {k: v for k, v in latest.items() if v is not None} == dict.fromkeys(keys[1:], b"v4")
    assert all(v == b"v4" for k, v in survivors if k != keys[0]), "an old value survived compaction"


async def test_broker_refuses_to_auto_create_topics(producer_factory) -> None:
    producer: AIOKafkaProducer = await producer_factory(request_timeout_ms=3000)
    with pytest.raises(KafkaError):
        await asyncio.wait_for(producer.send_and_wait("never-created-topic", b"x"), 10)


def test_second_start_is_harmless(kafka_bootstrap: str, kafka_data_dir: Path, budgetflow_cli) -> None:
    if os.environ.get("BUDGETFLOW_TEST_BOOTSTRAP"):
        pytest.skip("an external broker was given; this test starts the project's own")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    proc = subprocess.run(
        budgetflow_cli("kafka", "start", "--data-dir", str(kafka_data_dir)), capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == kafka_bootstrap
