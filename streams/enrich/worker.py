"""The enrich worker: consumes requests and usage, produces ledger entries, commits after the broker has them.

What a record becomes is the :class:`~budgetflow.streams.enrich.enricher.Enricher`'s; the worker sends each
ledger partition's entries as whole batches, waits for the broker, then commits. At-least-once is enough here:
entries are deterministic, and the aggregate makes them count once (docs/architecture.md, "Exactly once, and how
it is proven").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.settings import Settings
from budgetflow.streams.enrich.enricher import Enricher
from budgetflow.streams.kafka.batches import commit_offsets, send_in_batches
from budgetflow.streams.kafka.clients import client_options, group_consumer
from budgetflow.streams.kafka.dlq import send_dead_letter
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now, partition_for
from budgetflow.streams.rules.clock import Clock
from budgetflow.streams.rules.policies import PolicyBook
from budgetflow.streams.rules.scopes import BudgetResolver
from budgetflow.streams.rules.shards import global_shards
from budgetflow.streams.service.crash import crash_point
from budgetflow.streams.service.http import serve, worker_app

__all__ = ["EnrichWorker", "run"]

log = logging.getLogger(__name__)

LedgerRecords = dict[int, list[tuple[bytes, bytes]]]  # ledger partition: (key, value) of its entries, in order


class EnrichWorker:
    """Consumes requests and usage, produces ledger entries, commits after the broker has them."""

    def __init__(self, settings: Settings, enricher: Enricher, topics: Topics) -> None:
        self.settings = settings
        self.enricher = enricher
        self.topics = topics
        self.group_id = f"{settings.topics.prefix}enrich"
        self.processed = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._positions: dict[TopicPartition, int] = {}
        self.first_batch_at: float | None = None  # perf_counter of the first records (benchmarks)
        self.metrics = enricher.metrics
        self.metrics.start_counters("enrich")
        self.metrics.registry.register(_LagCollector(self))

    async def _serve_metrics(self) -> Any:
        def health() -> tuple[bool, dict[str, Any]]:
            ready = self._consumer is not None and bool(self._consumer.assignment())
            return ready, {"ready": ready}

        app = worker_app(self.metrics.registry, health)
        runner = await serve(app, self.settings.web.host, self.settings.metrics.port, "BUDGETFLOW_METRICS__PORT")
        log.info("enrich metrics on port %d", runner.addresses[0][1])
        return runner

    async def _reload_prices(self, stop: asyncio.Event) -> None:
        """Reload the override price file when it changes; a bad file is refused and the old prices kept."""
        from budgetflow.tokenizers import PriceTable

        path = self.settings.pricing.file
        assert path is not None

        def signature() -> tuple[int, int] | None:
            try:
                stat = path.stat()
            except OSError:
                return None
            return stat.st_mtime_ns, stat.st_size

        seen = signature()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.pricing.reload_s)
            now = signature()
            if now is None or now == seen:
                continue
            seen = now
            try:
                table = await asyncio.to_thread(PriceTable.from_settings, self.settings.pricing)
            except ConfigError as exc:
                log.error("price file not reloaded, the old prices stay: %s", exc)
                continue
            self.enricher.estimator = dataclasses.replace(self.enricher.estimator, table=table)
            log.info("prices reloaded from %s (version %s)", path, table.version)

    def _unknown_budget(self, budget: str) -> None:
        m = self.metrics
        m.child(m.unknown_budgets, m.unknown_budget_ids(budget)).inc()

    @functools.lru_cache(maxsize=65_536)  # noqa: B019  # budget ids repeat; the worker lives as long as the process
    def _partition(self, budget: str, partitions: int) -> int:
        return partition_for(budget, partitions)

    def lag(self) -> dict[str, int]:
        """Records behind the end, per input partition."""
        if self._consumer is None:
            return {}
        out = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                position = self._positions.get(tp, 0)
                out[f"{tp.topic.rsplit('.', 1)[-1]}-{tp.partition}"] = max(0, int(highwater) - position)
        return out

    async def run(self, stop: asyncio.Event) -> None:
        options = client_options(self.settings.kafka)
        await ensure_topics_now(self.settings, self.topics)
        producer = AIOKafkaProducer(
            **options, enable_idempotence=True, acks="all", linger_ms=5, max_batch_size=256 * 1024
        )
        consumer = group_consumer(
            self.settings.kafka,
            self.group_id,
            self.topics.requests.name,
            self.topics.usage.name,
            self.topics.lease_asks.name,
            max_poll_records=self.settings.worker.max_batch_records,
        )
        async with contextlib.AsyncExitStack() as stack:
            await self._follow_policies(stack)
            if self.settings.pricing.file is not None and self.settings.pricing.reload_s > 0:
                reloader = asyncio.create_task(self._reload_prices(stop), name="price-reload")
                stack.callback(reloader.cancel)
            await producer.start()
            stack.push_async_callback(producer.stop)
            await consumer.start()
            stack.push_async_callback(consumer.stop)
            self._consumer = consumer
            runner = await self._serve_metrics()
            stack.push_async_callback(runner.cleanup)
            # Build the vocabularies now, not inside the first batch.
            for model in ("gpt-4o", "gpt-4"):
                self.enricher.estimator.registry.count_text(model, "warm up")
            log.info("enrich worker started (group %s)", self.group_id)
            while not stop.is_set():
                batch = await consumer.getmany(
                    timeout_ms=self.settings.worker.poll_timeout_ms, max_records=self.settings.worker.max_batch_records
                )
                if batch:
                    await self._cycle(consumer, producer, batch)

    async def _follow_policies(self, stack: contextlib.AsyncExitStack) -> None:
        """Budget scopes and parents come from the policies, followed like a view follows statuses."""
        resolver = BudgetResolver(
            lambda: book.policies,
            self.settings.unknown_budget,
            on_unknown=self._unknown_budget,
            global_shards=global_shards(self.settings),
        )
        book = PolicyBook(
            self.settings,
            self.topics.policies.name,
            on_change=resolver.invalidate,
            on_skip=self.metrics.policy_skipped.inc,
        )
        await book.start()
        stack.push_async_callback(book.stop)
        resolver.invalidate()
        self.enricher.resolver = resolver

    async def _cycle(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        batch: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        """Enrich a batch, send its entries and dead letters, wait for the broker, commit."""
        if self.first_batch_at is None:
            self.first_batch_at = time.perf_counter()
        entries, sends = await self._enrich_batch(producer, batch)
        # Whole batches per ledger partition: the same partition the default partitioner picks for the key.
        for partition, records in entries.items():
            sent = await send_in_batches(producer, self.topics.ledger.name, partition, records)
            sends += [b.delivery for b in sent]
        crash_point("enrich.after_send")
        await asyncio.gather(*sends)
        crash_point("enrich.before_commit")
        # A failed commit: a rebalance took the partitions, their new owner redoes these records, and the
        # aggregate's idempotent state absorbs the duplicates.
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
        await commit_offsets(consumer, offsets, "records will be redelivered")

    async def _enrich_batch(
        self, producer: AIOKafkaProducer, batch: dict[TopicPartition, list[ConsumerRecord]]
    ) -> tuple[LedgerRecords, list[Awaitable[Any]]]:
        """Each record's ledger entries, by ledger partition; its dead letter, handed to the producer at once."""
        partitions = self.topics.ledger.partitions
        entries: LedgerRecords = {}
        dead_letters: list[Awaitable[Any]] = []
        produced = 0
        for tp, records in batch.items():
            for record in records:
                result = self.enricher.enrich(tp.topic, tp.partition, record.offset, record.key, record.value)
                for budget, value in result.entries:
                    entries.setdefault(self._partition(budget, partitions), []).append((budget.encode(), value))
                produced += len(result.entries)
                if result.dead is not None:
                    dead_letters.append(await send_dead_letter(producer, self.topics.dlq.name, result.dead))
                    produced += 1
            self.processed += len(records)
            self._positions[tp] = records[-1].offset + 1
            self.metrics.child(self.metrics.records, "enrich", "in").inc(len(records))
        self.metrics.child(self.metrics.records, "enrich", "out").inc(produced)
        return entries, dead_letters


class _LagCollector(Collector):
    """The enrich stage's consumer lag per input partition, at scrape time."""

    def __init__(self, worker: EnrichWorker) -> None:
        self.worker = worker

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "budgetflow_consumer_lag_records", "Records behind the end of the input.", labels=["stage", "partition"]
        )
        for partition, behind in sorted(self.worker.lag().items()):
            family.add_metric(["enrich", partition], behind)
        yield family


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """The enrich role: its estimator from the settings, run until ``stop``."""
    from budgetflow.tokenizers import Estimator

    topics = Topics.from_settings(settings)
    enricher = Enricher(
        Estimator.from_settings(settings),
        topics,
        keep_raw=settings.dlq.keep_raw,
        clock=Clock(settings.clock),
        max_clock_skew_s=settings.max_clock_skew_s,
    )
    await EnrichWorker(settings, enricher, topics).run(stop)
