"""The requests topic holds prompt text, so its retention must really delete: its segments roll on time.

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
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from budgetflow.streams.clients import client_options

pytestmark = pytest.mark.timeout(300)


async def test_requests_topic_retention_deletes_old_records(pipeline_factory: Any) -> None:
    pipeline = pipeline_factory(clock_start=datetime.now(UTC).isoformat(), speed=1.0,
                                extra_env={"BUDGETFLOW_TOPICS__REQUESTS_RETENTION_MS": "3000",
                                           "BUDGETFLOW_TOPICS__REQUESTS_SEGMENT_MS": "1000"})  # fmt: skip
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
