"""Read what the pipeline published: statuses, heartbeats, period states (for the CLI and tests)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import BudgetStatus, Heartbeat
from budgetflow.schemas.serde import decode
from budgetflow.schemas.settings import Settings
from budgetflow.streams.aggregate.ledger import PeriodState, decode_key
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.topics import topic_partitions

__all__ = ["read_heartbeats", "read_period_states", "read_statuses", "read_topic"]


async def read_topic(settings: Settings, topic: str) -> list[tuple[int, bytes | None, bytes | None, int]]:
    """Every record of a topic from its beginning to its end now: (partition, key, value, offset)."""
    return [(r.partition, r.key, r.value, r.offset) for r in await read_records(settings, topic)]


async def read_records(settings: Settings, topic: str) -> list[ConsumerRecord]:
    """Every record of a topic from its beginning to its end now, as the consumer gave them (timestamps too)."""
    consumer = AIOKafkaConsumer(**client_options(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await topic_partitions(settings, topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        out: list[ConsumerRecord] = []
        pending = {tp for tp in partitions if ends[tp] > 0}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=50_000)
            for records in batch.values():
                out.extend(records)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


async def read_statuses(settings: Settings, topic: str) -> dict[str, BudgetStatus]:
    """The latest status per budget: the highest ``seq`` wins, and on a tie the later record."""
    latest: dict[str, BudgetStatus] = {}
    for _, key, value, _ in await read_topic(settings, topic):
        if key is None or value is None:
            continue
        try:
            status, _ = decode(BudgetStatus, value)
        except InvalidEvent:
            continue
        current = latest.get(status.budget_id)
        if current is None or status.seq >= current.seq:
            latest[status.budget_id] = status
    return latest


async def read_heartbeats(settings: Settings, topic: str) -> dict[int, Heartbeat]:
    """The latest heartbeat per ledger partition."""
    latest: dict[int, Heartbeat] = {}
    for _, _, value, _ in await read_topic(settings, topic):
        try:
            beat, _ = decode(Heartbeat, value)
        except InvalidEvent:
            continue
        latest[beat.partition] = beat
    return latest


async def read_period_states(settings: Settings, topic: str) -> dict[tuple[str, str], PeriodState]:
    """The aggregate's exact period states, from its changelog (latest value per key)."""
    states: dict[tuple[str, str], PeriodState] = {}
    for _, key, value, _ in await read_topic(settings, topic):
        if key is None or not key.startswith(b"p|"):
            continue
        _, (budget, period) = decode_key(key)
        if value is None:
            states.pop((budget, period), None)
        else:
            states[(budget, period)] = PeriodState.decode(budget, period, value)
    return states
