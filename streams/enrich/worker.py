"""The enrich stage: requests and usage in, one priced ledger entry per budget out.

Stateless and deterministic: the same event and price table give the same
entries (with deterministic ids) on any worker and on any redelivery, so
at-least-once delivery is enough here; the aggregate makes it exact. No
prompt text leaves this stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from budgetflow.schemas.errors import ConfigError, InvalidEvent
from budgetflow.schemas.events import GLOBAL_BUDGET, MAX_TOKENS, Backend, RequestEvent, UsageEvent, entry_id
from budgetflow.schemas.money import MAX_ENTRY_PICO, format_usd, pico_to_float_usd
from budgetflow.schemas.serde import decode, dumps
from budgetflow.schemas.settings import Settings
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.dlq import DeadLetter, send_dead_letter
from budgetflow.streams.kafka.topics import Topics, ensure_topics, partition_for
from budgetflow.streams.rules.clock import Clock
from budgetflow.streams.rules.policies import PolicyBook
from budgetflow.streams.rules.scopes import BudgetResolver
from budgetflow.streams.service.crash import crash_point
from budgetflow.streams.service.http import serve, worker_app
from budgetflow.streams.service.metrics import PipelineMetrics
from budgetflow.tokenizers.estimate import Estimator

__all__ = ["EnrichResult", "EnrichWorker", "Enricher", "run"]

log = logging.getLogger(__name__)


def _budgets(listed: Iterable[str]) -> list[str]:
    """The request's budgets with ``global`` implied, each once, in a stable order."""
    return list(dict.fromkeys([*listed, GLOBAL_BUDGET]))


@dataclass
class EnrichResult:
    """What one input record became: ledger entries as (budget id, JSON), or a dead letter."""

    entries: list[tuple[str, bytes]] = field(default_factory=list)
    dead: DeadLetter | None = None
    unknown_fields: tuple[str, ...] = ()


class Enricher:
    """Turns one raw input record into ledger entries, or into a dead letter."""

    def __init__(
        self,
        estimator: Estimator,
        topics: Topics,
        *,
        keep_raw: bool = False,
        metrics: PipelineMetrics | None = None,
        clock: Clock | None = None,
        max_clock_skew_s: float = 300.0,
        resolver: BudgetResolver | None = None,
    ) -> None:
        self.estimator = estimator
        self.topics = topics
        self.keep_raw = keep_raw
        self.metrics = metrics or PipelineMetrics()
        self.clock = clock or Clock()
        self.max_clock_skew_s = max_clock_skew_s
        # Without one (tests, benchmarks): the budgets the gateway names, and global.
        self.resolver = resolver

    def _budgets_of(
        self, listed: list[str], model: str, provider: str, backend: str, metadata: dict[str, str]
    ) -> list[str]:
        if self.resolver is None:
            return _budgets(listed)
        return self.resolver.resolve(listed, model=model, provider=provider, backend=backend, metadata=metadata)

    def enrich(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> EnrichResult:
        is_request = topic == self.topics.requests.name
        try:
            if is_request:
                request, unknown = decode(RequestEvent, value)
                self._not_future(request.occurred_at, "occurred_at")
                result = EnrichResult(self.reserve(request), unknown_fields=unknown)
            else:
                usage, unknown = decode(UsageEvent, value)
                self._not_future(usage.request_occurred_at, "request_occurred_at")
                self._not_future(usage.occurred_at, "occurred_at")
                result = EnrichResult(self.settle(usage), unknown_fields=unknown)
        except InvalidEvent as exc:
            return self._dead(exc.reason, str(exc), topic, partition, offset, key, value)
        except Exception as exc:  # a defect must not stop the stream on one record: DLQ it, loudly
            log.exception("enrich failed on %s[%d]@%d; dead-lettered as internal", topic, partition, offset)
            return self._dead(
                "internal", f"enrich failed: {exc.__class__.__name__}", topic, partition, offset, key, value
            )
        if unknown:
            self.metrics.unknown_fields.labels("requests" if is_request else "usage").inc(len(unknown))
        return result

    def _dead(
        self, reason: str, message: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> EnrichResult:
        self.metrics.dead_letters.labels("enrich", reason).inc()
        return EnrichResult(
            dead=DeadLetter.of_record(
                "enrich", reason, message, topic, partition, offset, key, value, keep_raw=self.keep_raw
            )
        )

    def _not_future(self, moment: datetime, field: str) -> None:
        """An event from beyond the allowed clock skew would count in a month that has not begun."""
        ahead = (moment - self.clock.now()).total_seconds()
        if ahead > self.max_clock_skew_s:
            raise InvalidEvent(
                "future", f"{field}: {ahead:.0f} s ahead of the clock (skew allowed: {self.max_clock_skew_s:.0f} s)"
            )

    def _model_label(self, model: str, backend: Backend, provider: str) -> str:
        price = self.estimator.table.price(model, backend=backend, provider=provider)
        return self.metrics.models(price.match) if price.priced else "other"

    def reserve(self, event: RequestEvent) -> list[tuple[str, bytes]]:
        began = time.perf_counter()
        estimate = self.estimator.estimate(event)
        if estimate.input_tokens > MAX_TOKENS:
            raise InvalidEvent(
                "out_of_range", f"input: {estimate.input_tokens} tokens, more than a ledger entry holds ({MAX_TOKENS})"
            )
        m = self.metrics
        m.child(m.count_duration, estimate.tier).observe(time.perf_counter() - began)
        label = self._model_label(event.model, event.backend, event.provider)
        m.child(m.tokens, estimate.tier, label, "input").inc(estimate.input_tokens)
        if not estimate.priced:
            m.child(m.unpriced, m.unpriced_models(event.model)).inc()
        common = {
            "request_id": event.request_id,
            "attempt": event.attempt,
            "kind": "reserve",
            "period": event.period,
            "amount_pico_usd": estimate.pico_usd,
            "model": event.model,
            "provider": event.provider,
            "backend": estimate.backend,
            "input_tokens": estimate.input_tokens,
            "output_tokens": estimate.output_tokens,
            "tier": estimate.tier,
            "priced": estimate.priced,
            "price_version": estimate.price_version,
            "occurred_at": event.occurred_at,
            "ttl_s": estimate.ttl_s,
        }
        budgets = self._budgets_of(event.budgets, event.model, event.provider, event.backend, event.metadata)
        return [(budget, entry_json(common, budget)) for budget in budgets]

    def settle(self, event: UsageEvent) -> list[tuple[str, bytes]]:
        cost = self.estimator.price_usage(event)
        if cost.pico_usd > MAX_ENTRY_PICO:
            raise InvalidEvent(
                "out_of_range",
                f"cost ${format_usd(cost.pico_usd, 2)} is past the bound of one "
                f"entry (${format_usd(MAX_ENTRY_PICO, 0)})",
            )
        # The TTL its reserve had (the request's model at the request's time); the ledger keeps the first one anyway.
        price = self.estimator.table.price(
            event.request_model or event.model,
            backend=event.backend,
            provider=event.provider,
            at=event.request_occurred_at,
        )
        ttl = price.reservation_ttl_s or self.estimator.reservation.ttl_s
        m = self.metrics
        label = self._model_label(event.model, event.backend, event.provider)
        m.child(m.cost, label, cost.backend).observe(pico_to_float_usd(cost.pico_usd))
        for kind, count in (
            ("input", event.input_tokens),
            ("cached", event.cached_input_tokens),
            ("output", event.output_tokens),
            ("reasoning", event.reasoning_tokens),
        ):
            if count:
                m.child(m.tokens, "reported", label, kind).inc(count)
        common = {
            "request_id": event.request_id,
            "attempt": event.attempt,
            "kind": "settle",
            "period": event.period,
            "amount_pico_usd": cost.pico_usd,
            "model": event.model,
            "provider": event.provider,
            "backend": cost.backend,
            "input_tokens": event.input_tokens,
            "output_tokens": event.output_tokens,
            "cached_input_tokens": event.cached_input_tokens,
            "reasoning_tokens": event.reasoning_tokens,
            "tier": "reported",
            "priced": cost.priced,
            "price_version": cost.price_version,
            "occurred_at": event.request_occurred_at,
            "usage_at": event.occurred_at,
            "outcome": event.outcome,
            "ttl_s": ttl,
        }
        budgets = self._budgets_of(
            event.budgets, event.request_model or event.model, event.provider, event.backend, event.metadata
        )
        return [(budget, entry_json(common, budget)) for budget in budgets]


def entry_json(common: dict[str, Any], budget: str) -> bytes:
    """A LedgerEntry's JSON for one budget, built without the model (a test holds it equal to the model's)."""
    return dumps(
        {
            "v": 1,
            "entry_id": entry_id(common["request_id"], common["attempt"], common["kind"], budget),
            "budget_id": budget,
            **common,
        }
    )


class EnrichWorker:
    """Consumes requests and usage, produces ledger entries, commits after the broker has them."""

    def __init__(self, settings: Settings, enricher: Enricher, topics: Topics) -> None:
        self.settings = settings
        self.enricher = enricher
        self.topics = topics
        self.group_id = f"{settings.topics.prefix}enrich"
        self.processed = 0
        self.dead_letters = 0
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
        self.metrics_port = runner.addresses[0][1]
        log.info("enrich metrics on port %d", self.metrics_port)
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
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**options)
        await admin.start()
        try:
            await ensure_topics(admin, self.topics)
        finally:
            await admin.close()
        producer = AIOKafkaProducer(
            **options, enable_idempotence=True, acks="all", linger_ms=5, max_batch_size=256 * 1024
        )
        consumer = AIOKafkaConsumer(
            self.topics.requests.name,
            self.topics.usage.name,
            **options,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.settings.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.settings.kafka.heartbeat_interval_ms,
            max_poll_records=self.settings.worker.max_batch_records,
        )
        async with contextlib.AsyncExitStack() as stack:
            # Budget scopes and parents come from the policies, followed like a view follows statuses.
            resolver = BudgetResolver(
                lambda: book.policies, self.settings.unknown_budget, on_unknown=self._unknown_budget
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

    async def _cycle(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        batch: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        if self.first_batch_at is None:
            self.first_batch_at = time.perf_counter()
        sends = []
        ledger = self.topics.ledger.name
        partitions = self.topics.ledger.partitions
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        produced = 0
        for tp, records in batch.items():
            for record in records:
                result = self.enricher.enrich(tp.topic, tp.partition, record.offset, record.key, record.value)
                for budget, value in result.entries:
                    by_partition.setdefault(self._partition(budget, partitions), []).append((budget.encode(), value))
                produced += len(result.entries)
                if result.dead is not None:
                    self.dead_letters += 1
                    sends.append(await send_dead_letter(producer, self.topics.dlq.name, result.dead))
                    produced += 1
            self.processed += len(records)
            self._positions[tp] = records[-1].offset + 1
            self.metrics.child(self.metrics.records, "enrich", "in").inc(len(records))
        self.metrics.child(self.metrics.records, "enrich", "out").inc(produced)
        # Whole batches per ledger partition: the same partition the default partitioner picks for the key.
        for partition, items in by_partition.items():
            index = 0
            while index < len(items):
                out = producer.create_batch()
                start = index
                while (
                    index < len(items)
                    and out.append(key=items[index][0], value=items[index][1], timestamp=None) is not None
                ):
                    index += 1
                if index == start:
                    raise ValueError("a ledger entry does not fit in a producer batch")
                sends.append(await producer.send_batch(out, ledger, partition=partition))
        crash_point("enrich.after_send")
        await asyncio.gather(*sends)
        crash_point("enrich.before_commit")
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance took the partitions: the new owner redoes these records, and
            # the aggregate's idempotent state absorbs the duplicates.
            log.warning("commit failed (%s); records will be redelivered", exc.__class__.__name__)


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
    from budgetflow.tokenizers import Estimator, PriceTable, TokenizerRegistry
    from budgetflow.tokenizers.registry import TokenizerRule

    topics = Topics.from_settings(settings)
    registry = TokenizerRegistry.default(
        [TokenizerRule(r.match, r.encoding, r.tier) for r in settings.tokenizers.rules]
    )
    table = PriceTable.from_settings(settings.pricing)
    estimator = Estimator(registry, table, settings.reservation, settings.tokenizers, settings.pricing)
    enricher = Enricher(
        estimator,
        topics,
        keep_raw=settings.dlq.keep_raw,
        clock=Clock(settings.clock),
        max_clock_skew_s=settings.max_clock_skew_s,
    )
    await EnrichWorker(settings, enricher, topics).run(stop)
