"""What the benchmark modules share: sample text, percentiles, the bench broker and its settings, ledger fills.

Every benchmark module imports from here and none from another benchmark module, so that
`bench` (the runner) can import the sections without a cycle. Importing it loads no Kafka client:
the sections that need none (`budgetflow bench --only tokenizers`) stay light.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from budgetflow.schemas.events import LedgerEntry, entry_id, period_of
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import Settings
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.service.launch import worker_env

if TYPE_CHECKING:
    from budgetflow.streams.kafka.topics import Topics

__all__ = [
    "CODE",
    "OTHER",
    "WORDS",
    "GroupOffsets",
    "aggregate_rate",
    "bench_env",
    "bench_kafka",
    "bench_settings",
    "cap_policies",
    "fill",
    "ledger_entries",
    "percentiles_us",
    "quantiles_ms",
    "raw_consume",
    "sample_text",
    "settle_cells",
    "wait_heartbeats",
    "worker_rate",
]

WORDS = (
    "the budget model request token price cloud local router gateway limit spend month usage cache reasoning "
    "answer question summarize explain code function return value error retry latency stream kafka partition "
    "offset ledger status policy team project customer invoice report table row column schema json field"
).split()
CODE = [
    "def handler(event):\n    return {'ok': True}\n",
    "for (let i = 0; i < n; i++) { total += a[i]; }\n",
    "SELECT id, sum(cost) FROM ledger GROUP BY id;\n",
    'if err != nil {\n\treturn fmt.Errorf("x: %w", err)\n}\n',
]
OTHER = [
    "Grüße aus München. ",
    "日本語の文章も少し。",
    "¿Qué tal? ",
    "Привет, мир. ",
    "emoji 🚀✨ ",
    "42 3.14159 2026-11-29 ",
]


def sample_text(rng: random.Random, n_bytes: int) -> str:
    """Chat-like text of about ``n_bytes`` UTF-8 bytes: prose, some code, numbers, other scripts."""
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        roll = rng.random()
        if roll < 0.08:
            piece = rng.choice(CODE)
        elif roll < 0.14:
            piece = rng.choice(OTHER)
        else:
            piece = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + ". "
        parts.append(piece)
        size += len(piece.encode())
    return "".join(parts).encode()[:n_bytes].decode("utf-8", "ignore")


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    """p50, p95 and p99 of timings in nanoseconds, in microseconds."""
    ordered = sorted(samples_ns)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    return {"p50_us": pick(0.50), "p95_us": pick(0.95), "p99_us": pick(0.99)}


def quantiles_ms(samples: list[float]) -> dict[str, float]:
    """Median, p95, p99 and maximum of latencies in milliseconds."""
    ordered = sorted(samples)
    return {
        "p50_ms": statistics.median(ordered),
        "p95_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": ordered[-1],
    }


@contextlib.contextmanager
def bench_kafka(root: Path) -> Iterator[str]:
    """A broker for the benchmarks: the given one, or a local one started (and stopped) here."""
    given = os.environ.get("BUDGETFLOW_BENCH_BOOTSTRAP")
    if given:
        yield given
        return
    from budgetflow.schemas.settings import LocalKafkaSettings
    from budgetflow.streams.dev.localkafka import LocalKafka

    broker = LocalKafka(root / "kafka", LocalKafkaSettings(port=0, heap_mb=1024, jvm_gc="g1"))
    address = broker.start()
    try:
        yield address
    finally:
        broker.stop()


def bench_settings(bootstrap: str, prefix: str, data_dir: Path, **extra: Any) -> Settings:
    """Settings of an in-process client or worker of a benchmark: topics of its own, eight partitions."""
    return Settings(
        kafka={"bootstrap_servers": bootstrap},  # type: ignore[arg-type]  # pydantic builds the section
        topics={"prefix": prefix, "partitions": 8},  # type: ignore[arg-type]
        data_dir=data_dir,
        **extra,
    )


def bench_env(bootstrap: str, prefix: str, root: Path, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's worker processes: quiet, fast heartbeats, no fixed ports."""
    return worker_env(
        {
            "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "BUDGETFLOW_TOPICS__PREFIX": prefix,
            "BUDGETFLOW_TOPICS__PARTITIONS": "8",
            "BUDGETFLOW_DATA_DIR": str(root),
            "BUDGETFLOW_HEARTBEAT_S": "0.5",
            "BUDGETFLOW_LOG_LEVEL": "WARNING",
            "BUDGETFLOW_WEB__PORT": "0",
            "BUDGETFLOW_METRICS__PORT": "0",
            **extra,
        }
    )


def ledger_entries(n: int, budgets: list[str]) -> list[tuple[str, bytes]]:
    """``n`` ledger entries (a reserve and its settle per request) over ``budgets``, keyed by budget."""
    now = datetime.now(UTC)
    period = period_of(now)
    out = []
    for i in range(n // 2):
        budget = budgets[i % len(budgets)]
        for kind, amount in (("reserve", 1_000_000_000), ("settle", 900_000_000)):
            entry = LedgerEntry(
                entry_id=entry_id(f"b{i}", 0, kind, budget),
                budget_id=budget,
                request_id=f"b{i}",
                kind=kind,  # type: ignore[arg-type]
                period=period,
                amount_pico_usd=amount,
                occurred_at=now,
                model="gpt-4o",
                provider="openai",
                ttl_s=3600,
            )
            out.append((budget, dumps(entry)))
    return out


async def fill(settings: Settings, topic: str, records: list[tuple[str, bytes]]) -> None:
    """Produce ``records`` (key, value) to ``topic`` and wait until the broker has them all."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        **client_options(settings.kafka), linger_ms=20, max_batch_size=1 << 20, enable_idempotence=True
    )
    await producer.start()
    try:
        for key, value in records:
            await producer.send(topic, key=key.encode(), value=value)
        await producer.flush()
    finally:
        await producer.stop()


async def raw_consume(settings: Settings, topic: str, total: int) -> float:
    """Entries per second of a consumer that reads the topic and does nothing."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        **client_options(settings.kafka),
        group_id=f"raw-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=5000,
    )
    await consumer.start()
    try:
        seen = 0
        began: float | None = None
        while seen < total:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            if batch and began is None:
                began = time.perf_counter()
            seen += sum(len(r) for r in batch.values())
        assert began is not None
        return total / (time.perf_counter() - began)
    finally:
        await consumer.stop()


async def aggregate_rate(settings: Settings, total: int) -> float:
    """Entries per second of one aggregate worker, real state and exactly-once mechanism included."""
    from budgetflow.streams.aggregate.role import aggregate_worker

    worker = aggregate_worker(settings)  # as `budgetflow worker` runs it: stats API and gauges too
    return await worker_rate(worker, total)


class _Measured(Protocol):
    processed: int
    first_batch_at: float | None

    async def run(self, stop: asyncio.Event) -> None: ...


async def worker_rate(worker: _Measured, total: int) -> float:
    """Records per second of a worker, from its first batch until it has processed ``total``."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        while worker.processed < total:  # polling a counter, deliberately cheap
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        assert worker.first_batch_at is not None
        return total / (time.perf_counter() - worker.first_batch_at)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def wait_heartbeats(settings: Settings, topics: Topics, timeout_s: float = 90) -> None:
    """Until every ledger partition has sent a heartbeat (workers up, partitions assigned)."""
    from budgetflow.streams.ops.readback import read_heartbeats

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(await read_heartbeats(settings, topics.heartbeats.name)) >= topics.ledger.partitions:
            await asyncio.sleep(1.0)  # let enrich finish joining its group too
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"workers did not come up within {timeout_s:.0f} s")


async def cap_policies(settings: Settings, topics: Topics, root: Path, budgets: list[str], limit_usd: str) -> None:
    """The workers up, then a ``block_all`` policy of ``limit_usd`` on each budget, then a status of each on the
    topic (the routers under test decide on it): the hard-cap benches' start."""
    from budgetflow.streams.ops.policy_admin import apply_policy_file
    from budgetflow.streams.ops.readback import read_statuses

    await wait_heartbeats(settings, topics)
    line = '  - {{id: "{}", monthly_limit_usd: "{}", hard_limit_action: block_all}}\n'
    policies = root / "policies.yaml"
    policies.write_text("budgets:\n" + "".join(line.format(b, limit_usd) for b in budgets))
    await apply_policy_file(settings, topics.policies.name, policies, prune=False)
    deadline = time.monotonic() + 60
    while not set(budgets) <= set(await read_statuses(settings, topics.status.name)):
        if time.monotonic() > deadline:
            raise TimeoutError("no status of the bench's budgets within 60 s")
        await asyncio.sleep(0.5)


async def settle_cells(
    settings: Settings, topics: Topics, rows: list[dict[str, Any]], per_request_pico: int, timeout_s: float = 120
) -> None:
    """Wait until the ledger has settled every admitted request of each row (``budget_id``, ``admitted``); its
    settled spend, settles and reservations into the rows, and whether it is exact (admitted x the cost)."""
    from budgetflow.schemas.money import format_usd
    from budgetflow.streams.ops.readback import read_period_states

    deadline = time.monotonic() + timeout_s
    while True:
        states = {b: s for (b, _), s in (await read_period_states(settings, topics.state.name)).items()}
        found = [states.get(r["budget_id"]) for r in rows]
        done = all(
            (s.settles, s.reserved) == (r["admitted"], 0) if s else r["admitted"] == 0
            for r, s in zip(rows, found, strict=True)
        )
        if done or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    for row, state in zip(rows, found, strict=True):
        settled, reserved = (state.settled, state.reserved) if state else (0, 0)
        row["spend_usd"] = format_usd(settled, 6)
        row["settles"] = state.settles if state else 0
        row["reserved_usd"] = format_usd(reserved, 6)
        row["ledger_exact"] = settled == row["admitted"] * per_request_pico and reserved == 0


class GroupOffsets:
    """A consumer group's committed offsets on a topic, and the topic's end offsets (an admin client and a consumer
    kept open for the polls of one run)."""

    def __init__(self, settings: Settings, group: str, topic: str) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        self.settings, self.group, self.topic = settings, group, topic
        self.admin = AIOKafkaAdminClient(**client_options(settings.kafka))
        self.consumer = AIOKafkaConsumer(**client_options(settings.kafka), enable_auto_commit=False)
        self._partitions: list[int] | None = None

    async def __aenter__(self) -> GroupOffsets:
        await self.admin.start()
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()
        await self.admin.close()

    async def committed(self) -> dict[int, int]:
        """Per partition, the group's committed offset (-1: none yet; no entry before the group exists)."""
        from aiokafka.errors import GroupCoordinatorNotAvailableError

        try:
            offsets = await self.admin.list_consumer_group_offsets(self.group)
        except GroupCoordinatorNotAvailableError:  # the group does not exist yet
            return {}
        return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == self.topic}

    async def total(self) -> int:
        return sum(max(0, offset) for offset in (await self.committed()).values())

    async def ends(self) -> dict[int, int]:
        from aiokafka import TopicPartition

        from budgetflow.streams.kafka.topics import topic_partitions

        if self._partitions is None:  # asked once: a topic's partitions are fixed
            self._partitions = await topic_partitions(self.settings, self.topic)
        ends = await self.consumer.end_offsets([TopicPartition(self.topic, p) for p in self._partitions])
        return {tp.partition: offset for tp, offset in ends.items()}

    async def members(self) -> int:
        """Members of the group when it is stable (0 while it rebalances, or before it exists)."""
        from aiokafka.errors import GroupCoordinatorNotAvailableError

        try:
            (response,) = await self.admin.describe_consumer_groups([self.group])
        except GroupCoordinatorNotAvailableError:
            return 0
        _, _, state, _, _, members, *_ = response.groups[0]
        return len(members) if state == "Stable" else 0
