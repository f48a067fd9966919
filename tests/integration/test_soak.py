"""Soak: traffic faster than one worker can take. Lag grows, then drains; memory stays bounded; nothing is
lost; statuses are right at the end. Short in CI; `make soak` runs it for ten minutes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

SOAK_S = float(os.environ.get("BUDGETFLOW_TEST_SOAK_S", "20"))
# Events per second offered: above what one enrich and one aggregate worker take end to end on a shared 2-core
# machine (about 12k usage events/s with the broker and this producer beside them). 40k/s is about as fast as
# this one producer goes; the ten-minute `make soak` offers 15k/s, so the backlog stays within the disk.
RATE = float(os.environ.get("BUDGETFLOW_TEST_SOAK_RATE", "40000"))
pytestmark = pytest.mark.timeout(int(SOAK_S * 4 + 300))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def group_lag(pipeline: Any, group: str, topics: list[str]) -> int:
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from budgetflow.streams.kafka.clients import client_options
    from budgetflow.streams.kafka.topics import topic_partitions

    settings = pipeline.settings()
    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(**client_options(settings.kafka))
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t in topics for p in await topic_partitions(settings, t)]
            ends = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
        return sum(ends[tp] - (committed[tp].offset if tp in committed else 0) for tp in tps)
    finally:
        await admin.close()


async def test_soak_above_capacity(pipeline_factory: Any, kit: Any) -> None:
    # A real-time clock: at the scenarios' hour-per-second the soak would outlive the dedupe horizon, and its
    # events would rightly go to the DLQ as late.
    pipeline, _ = await kit.start(pipeline_factory, n=10, speed=1.0)
    topics = pipeline.topics
    enrich = pipeline.start("enrich")
    aggregate = pipeline.start("aggregate")
    await asyncio.sleep(8)  # up and warm
    baseline = {"enrich": rss(enrich.proc.pid), "aggregate": rss(aggregate.proc.pid)}
    from aiokafka import AIOKafkaProducer

    from budgetflow.streams.kafka.clients import client_options

    producer = AIOKafkaProducer(**client_options(pipeline.settings().kafka), linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    settled: dict[Any, int] = {}
    requests: dict[Any, int] = {}
    produced = 0
    peak = {"enrich": 0, "aggregate": 0}
    lags: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            for name, worker in (("enrich", enrich), ("aggregate", aggregate)):
                peak[name] = max(peak[name], rss(worker.proc.pid))
            # The backlog of both stages: at some rates enrich keeps up and the ledger piles up instead.
            enrich_lag = await group_lag(pipeline, f"{pipeline.prefix}enrich", [topics.usage.name])
            ledger_lag = await group_lag(pipeline, f"{pipeline.prefix}aggregate", [topics.ledger.name])
            lags.append(enrich_lag + ledger_lag)
            if os.environ.get("SOAK_DEBUG"):
                print(f"t={time.monotonic() - began:.0f} enrich lag {enrich_lag} ledger lag {ledger_lag}", flush=True)
            await asyncio.sleep(1)

    watcher = asyncio.create_task(watch())
    began = time.monotonic()
    i = 0
    at = kit.START.isoformat()
    while time.monotonic() - began < SOAK_S:
        events: list[tuple[str, dict[str, Any]]] = []
        for _ in range(1000):
            event = {
                "v": 1,
                "request_id": f"soak-{i}",
                "request_occurred_at": at,
                "occurred_at": at,
                "budgets": [f"team:{'ab'[i % 2]}"],
                "model": "test-small",
                "provider": "testco",
                "backend": "cloud",
                "outcome": "completed",
                "input_tokens": 100 + i % 7,
                "output_tokens": 10,
                "cached_input_tokens": 0,
                "cache_write_input_tokens": 0,
                "reasoning_tokens": 0,
            }
            await producer.send(topics.usage.name, key=event["request_id"].encode(), value=orjson.dumps(event))
            events.append(("usage", event))
            i += 1
        # Every request id is new, so the expected sums add up chunk by chunk (the test holds no backlog either).
        chunk = kit.expected_of(events)
        for k, v in chunk.settled.items():
            settled[k] = settled.get(k, 0) + v
        for k, v in chunk.requests.items():
            requests[k] = requests.get(k, 0) + v
        produced += len(events)
        await asyncio.sleep(max(0.0, began + produced / RATE - time.monotonic()))
    await producer.stop()
    produced_for = time.monotonic() - began
    deadline = time.monotonic() + produced / 2000 + float(os.environ.get("SOAK_GRACE", "120"))
    states: dict[Any, Any] = {}
    while time.monotonic() < deadline:
        states = await pipeline.period_states()
        if {k: s.settled for k, s in states.items()} == settled:
            break
        await asyncio.sleep(1)
    drained_after = time.monotonic() - began - produced_for
    stop.set()
    await watcher
    print(
        f"soak: {produced} events in {produced_for:.0f} s ({produced / produced_for:,.0f}/s), "
        f"peak backlog {max(lags)} records (enrich + ledger), drained {drained_after:.0f} s after; RSS enrich "
        f"{baseline['enrich'] >> 20} -> {peak['enrich'] >> 20} MiB, aggregate {baseline['aggregate'] >> 20} -> "
        f"{peak['aggregate'] >> 20} MiB"
    )
    assert enrich.alive
    assert aggregate.alive
    # Nothing lost, nothing twice.
    assert {k: s.settled for k, s in states.items()} == settled, pipeline.logs()
    assert {k: s.requests for k, s in states.items()} == requests
    # The lag grew (the traffic was faster than the worker), then drained.
    assert max(lags) > 100_000, lags  # seconds of traffic waited in Kafka
    assert await group_lag(pipeline, f"{pipeline.prefix}enrich", [topics.usage.name]) == 0
    # The aggregate is caught up but for the ticks it writes itself every HEARTBEAT_S.
    assert await group_lag(pipeline, f"{pipeline.prefix}aggregate", [topics.ledger.name]) < 1000
    # Memory stayed bounded: backlog lives in Kafka, not in the workers.
    for name in ("enrich", "aggregate"):
        assert peak[name] < baseline[name] + 300 * 2**20, (name, baseline[name], peak[name])
    # Statuses are right at the end: each budget's last status carries its exact spend.
    latest: dict[str, dict[str, Any]] = {}
    for _, key, value, _ in await pipeline.records(topics.status.name):
        if value is not None:
            latest[key.decode()] = orjson.loads(value)
    for (budget, period), state in states.items():
        if period == latest[budget]["period"]:
            assert latest[budget]["settled_usd"] == _usd(state.settled), budget


def _usd(pico: int) -> str:
    from budgetflow.schemas.money import usd_string

    return usd_string(pico)
