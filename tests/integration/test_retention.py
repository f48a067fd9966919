"""Retention that must hold: the requests topic really deletes, the state changelog keeps its tombstones long enough.

The requests topic holds prompt text, so its retention must really delete: its segments roll on time.

Retention deletes whole closed segments only; with Kafka's default segment.ms (7 days) a 1-hour retention
would keep prompts for a week. Here the topic is created by `budgetflow topics create` with short settings,
and the broker (log.retention.check.interval.ms = 5 s) must drop the first records.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from budgetflow.streams.kafka.clients import client_options

pytestmark = pytest.mark.timeout(300)


async def test_requests_topic_retention_deletes_old_records(pipeline_factory: Any) -> None:
    pipeline = pipeline_factory(
        clock_start=datetime.now(UTC).isoformat(),
        speed=1.0,
        extra_env={
            "BUDGETFLOW_TOPICS__REQUESTS_RETENTION_MS": "3000",
            "BUDGETFLOW_TOPICS__REQUESTS_SEGMENT_MS": "1000",
        },
    )
    assert pipeline.cli("topics", "create").returncode == 0
    topic = pipeline.topics.requests.name
    options = client_options(pipeline.settings().kafka)
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    configs = {name: value for name, value, *_ in described[0].resources[0][4]}
    assert configs["retention.ms"] == "3000"
    assert configs["segment.ms"] == "1000"
    assert configs["cleanup.policy"] == "delete"

    tp = TopicPartition(topic, 0)
    producer = AIOKafkaProducer(**options)
    await producer.start()
    consumer = AIOKafkaConsumer(**options)
    await consumer.start()
    try:
        await producer.send_and_wait(topic, b'{"prompt": "first"}', partition=0)
        began = time.monotonic()
        deleted = False
        while time.monotonic() - began < 90:
            # A record each second rolls the segment (segment.ms is checked on append) ...
            await producer.send_and_wait(topic, b'{"prompt": "later"}', partition=0)
            # ... and the broker's retention check deletes the closed segments older than retention.ms.
            if (await consumer.beginning_offsets([tp]))[tp] > 0:
                deleted = True
                break
            await asyncio.sleep(1)
        print(f"requests retention: the first record was deleted {time.monotonic() - began:.0f} s after it was written")
        assert deleted, "the requests topic still holds its first record"
    finally:
        await producer.stop()
        await consumer.stop()


async def create_topic(options: dict[str, Any], spec: Any, configs: dict[str, str]) -> None:
    """A budgetflow topic as an older budgetflow (or an operator) made it: its name and partitions, these configs."""
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(spec.name, spec.partitions, 1, topic_configs=configs)])
    finally:
        await admin.close()


async def topic_configs(options: dict[str, Any], topic: str) -> dict[str, str]:
    """A topic's configs (waiting for a topic created a moment ago to be known)."""
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    deadline = time.monotonic() + 30
    try:
        while True:
            described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
            error_code, message, _, _, entries = described[0].resources[0]
            if not error_code:
                return {name: value for name, value, *_ in entries}
            assert time.monotonic() < deadline, f"cannot describe {topic}: {error_code} {message}"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def test_the_state_changelog_keeps_tombstones_as_long_as_the_rules_look_back(pipeline_factory: Any) -> None:
    """Kafka's default (1 day) would let a store a day behind miss deletions; budgetflow sets TTL + horizon + grace."""
    pipeline = pipeline_factory(clock_start=datetime.now(UTC).isoformat(), speed=1.0)
    assert pipeline.cli("topics", "create").returncode == 0
    configs = await topic_configs(client_options(pipeline.settings().kafka), pipeline.topics.state.name)
    # The default TTL (1 h) + dedupe horizon (1 day) + month grace (7 days).
    assert configs["delete.retention.ms"] == str((3_600 + 86_400 + 7 * 86_400) * 1000)
    assert configs["cleanup.policy"] == "compact"


async def test_an_older_changelog_gets_its_tombstone_retention_raised_in_place(pipeline_factory: Any) -> None:
    """A changelog created by an older budgetflow (or by hand) with a short delete.retention.ms is raised when a
    worker (here `topics create`) checks it, and keeps the other configs it had."""
    pipeline = pipeline_factory(clock_start=datetime.now(UTC).isoformat(), speed=1.0)
    options = client_options(pipeline.settings().kafka)
    state = pipeline.topics.state
    await create_topic(
        options, state, {"cleanup.policy": "compact", "delete.retention.ms": "1000", "min.cleanable.dirty.ratio": "0.3"}
    )
    assert (await topic_configs(options, state.name))["delete.retention.ms"] == "1000"
    proc = pipeline.cli("topics", "create")
    assert proc.returncode == 0, proc.stderr
    assert "raised" in proc.stderr, proc.stderr  # said in the log
    deadline = time.monotonic() + 30
    # The broker applies the change from the metadata log a moment later.
    while (configs := await topic_configs(options, state.name))["delete.retention.ms"] == "1000":
        assert time.monotonic() < deadline, "delete.retention.ms was not raised"
        await asyncio.sleep(0.2)
    assert configs["delete.retention.ms"] == state.config["delete.retention.ms"]
    assert configs["min.cleanable.dirty.ratio"] == "0.3", "the topic's other settings are kept"
    assert configs["cleanup.policy"] == "compact"
    # A second check finds nothing to do.
    proc = pipeline.cli("topics", "create")
    assert proc.returncode == 0, proc.stderr
    assert "raised" not in proc.stderr


async def test_a_checkpoint_older_than_the_tombstone_retention_must_restore_in_full(
    topic_factory: Any, producer_factory: Any, consumer_factory: Any
) -> None:
    """A store may resume from its checkpoint only if every changelog record after it is younger than
    delete.retention.ms (its tombstones cannot have been removed yet); else it restores from the start."""
    from budgetflow.streams.kafka.topics import checkpoint_resumable

    day_ms = 86_400_000
    topic = await topic_factory("changelog", partitions=2, config={"cleanup.policy": "compact"})
    producer = await producer_factory()
    now_ms = int(time.time() * 1000)
    # Partition 0: three records written two days ago (offsets 0-2), then three a minute ago (3-5).
    for i, age_ms in enumerate([2 * day_ms] * 3 + [60_000] * 3):
        await producer.send_and_wait(topic, b"v", key=f"k{i}".encode(), partition=0, timestamp_ms=now_ms - age_ms)
    # Partition 1: only old records (offsets 0-2).
    for i in range(3):
        await producer.send_and_wait(topic, None, key=f"k{i}".encode(), partition=1, timestamp_ms=now_ms - 2 * day_ms)
    consumer = await consumer_factory()
    young, old = TopicPartition(topic, 0), TopicPartition(topic, 1)

    async def resumable(tp: TopicPartition, checkpoint: int) -> bool:
        return await checkpoint_resumable(consumer, tp, checkpoint, day_ms, now_ms=now_ms)

    assert await resumable(young, 5)  # nothing after it
    assert await resumable(young, 2)  # only young records after it
    assert not await resumable(young, 1)  # offset 2 is two days old: a tombstone there may be gone
    assert not await resumable(young, -1)
    assert await resumable(old, 2)
    assert not await resumable(old, 1)
    # With a week of tombstone retention, two-day-old records still have theirs.
    assert await checkpoint_resumable(consumer, young, -1, 7 * day_ms, now_ms=now_ms)


async def test_a_ledger_made_with_producer_timestamps_is_set_to_the_brokers(pipeline_factory: Any) -> None:
    """A ledger topic created before ticks were bounded by broker time (CreateTime) is set to LogAppendTime when a
    worker (here `topics create`) checks it, keeping its retention: the bound of a tick needs the broker's clock."""
    pipeline = pipeline_factory(clock_start=datetime.now(UTC).isoformat(), speed=1.0)
    options = client_options(pipeline.settings().kafka)
    ledger = pipeline.topics.ledger
    await create_topic(
        options,
        ledger,
        {
            "cleanup.policy": "delete",
            "retention.ms": ledger.config["retention.ms"],
            "message.timestamp.type": "CreateTime",
        },
    )
    proc = pipeline.cli("topics", "create")
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 30
    while (configs := await topic_configs(options, ledger.name))["message.timestamp.type"] != "LogAppendTime":
        assert time.monotonic() < deadline, "message.timestamp.type was not set"
        await asyncio.sleep(0.2)
    assert configs["retention.ms"] == ledger.config["retention.ms"], "the ledger keeps its 400 days"
