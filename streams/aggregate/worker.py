"""The aggregate worker: owns ledger partitions, keeps their exact state, publishes statuses.

One cycle: take a batch of ledger entries, apply them to each partition's
:class:`PartitionLedger`, write the partition's changes to its changelog
partition (in the ledger's crash-safe order, one idempotent producer), send
statuses, transitions, heartbeats and dead letters, wait until the broker has
all of it, write the local store, and only then commit the ledger offsets.
A crash anywhere replays from the committed offsets onto state that may be
ahead of them, which the ledger's idempotence absorbs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, KafkaError

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import LedgerEntry, period_of
from budgetflow.schemas.serde import decode_fast, dumps
from budgetflow.schemas.settings import Settings
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.metrics import AggregateCollector
from budgetflow.streams.aggregate.statuses import Outgoing, StatusPublisher
from budgetflow.streams.aggregate.store import MemoryStore, RocksStore, Store
from budgetflow.streams.gateway.view import BudgetView
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.dlq import DeadLetter, send_dead_letter
from budgetflow.streams.kafka.topics import Topics, checkpoint_resumable, ensure_topics, partition_for
from budgetflow.streams.rules.clock import Clock, month_start, next_month_start
from budgetflow.streams.rules.forecast import Forecast, Forecaster
from budgetflow.streams.rules.policies import PolicyBook
from budgetflow.streams.service.crash import crash_due, crash_now, crash_point
from budgetflow.streams.service.http import serve
from budgetflow.streams.service.metrics import PipelineMetrics

__all__ = ["AggregateWorker", "run"]

log = logging.getLogger(__name__)

_LATE_MESSAGES = {
    "late_period": "the entry's period is closed (past its grace)",
    "late_horizon": "the entry's request is past its TTL and the dedupe horizon",
}
_OUT_OF_RANGE = "the entry would take its budget's month past the bound of a period (MAX_PERIOD_PICO)"


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type hints
    def __init__(self, worker: AggregateWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.worker.revoke([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.worker.assign([tp.partition for tp in assigned])


class AggregateWorker:
    """Consumes the ledger; state per partition; statuses, events and heartbeats out."""

    def __init__(self, settings: Settings, topics: Topics, clock: Clock) -> None:
        self.settings = settings
        self.topics = topics
        self.clock = clock
        self.group_id = f"{settings.topics.prefix}aggregate"
        self.config = LedgerConfig.from_settings(settings)
        self.ledgers: dict[int, PartitionLedger] = {}
        self._parked: dict[int, tuple[PartitionLedger, int]] = {}
        self._changelog_end: dict[int, int] = {}
        self.lock = asyncio.Lock()
        self._policy_changes: set[str] = set()
        self.metrics = PipelineMetrics()
        self.policies = PolicyBook(
            settings, topics.policies.name, self._policy_changed, self.metrics.policy_skipped.inc
        )
        self.metrics.start_counters("aggregate")
        self.metrics.registry.register(AggregateCollector(self, settings.metrics.max_budgets))
        self.forecaster = Forecaster(settings.forecast.window_s)
        self._sampled_at: dict[int, float] = {}
        self.publisher = StatusPublisher(
            self.config.rules,
            self.policies.policy_for,
            clock.now,
            settings.status.refresh_s,
            forecast=self.forecast,
            on_publish=self._published,
        )
        self._catch_up: dict[int, tuple[int, int | None]] = {}
        self._heartbeat_due: set[int] = set()
        self._last_record_ts: dict[int, float] = {}
        self._first_record_ts: dict[int, float] = {}
        self._outcomes: dict[tuple[str, str], int] = {}  # counted per entry, handed to Prometheus per cycle
        self.identity = ""
        self.processed = 0
        self.dead_letters = 0
        self.first_batch_at: float | None = None  # perf_counter of the first records (benchmarks)
        self.url: str | None = None
        self.view: BudgetView | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._restorer: AIOKafkaConsumer | None = None

    # -- life cycle ---------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        options = client_options(self.settings.kafka)
        admin = AIOKafkaAdminClient(**options)
        await admin.start()
        try:
            await ensure_topics(admin, self.topics)
            cluster = await admin.describe_cluster()
            self.identity = f"{cluster['cluster_id']}/{self.topics.state.name}"
        finally:
            await admin.close()
        async with contextlib.AsyncExitStack() as stack:
            self._producer = AIOKafkaProducer(
                **options, enable_idempotence=True, acks="all", linger_ms=2, max_batch_size=512 * 1024
            )
            await self._producer.start()
            stack.push_async_callback(self._producer.stop)
            # earliest: a restore that starts below the log start (records deleted by an operator) reads what is left
            self._restorer = AIOKafkaConsumer(
                **options, enable_auto_commit=False, max_partition_fetch_bytes=4 << 20, auto_offset_reset="earliest"
            )
            await self._restorer.start()
            stack.push_async_callback(self._restorer.stop)
            stack.push_async_callback(self.policies.stop)
            await self.policies.start()
            self._consumer = AIOKafkaConsumer(
                **options,
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=self.settings.kafka.session_timeout_ms,
                heartbeat_interval_ms=self.settings.kafka.heartbeat_interval_ms,
                max_poll_records=self.settings.worker.max_batch_records,
            )
            self._consumer.subscribe([self.topics.ledger.name], listener=_Rebalance(self))
            await self._consumer.start()
            stack.push_async_callback(self._consumer.stop)
            stack.callback(self._close_stores)
            self.view = BudgetView(self.settings, clock=self.clock)
            await self.view.start()
            stack.push_async_callback(self.view.stop)
            runner = await self._serve_web(self.view)
            stack.push_async_callback(runner.cleanup)
            ticker = asyncio.create_task(self._ticker(stop), name="ticker")
            stack.push_async_callback(_cancel, ticker)
            log.info("aggregate worker started (group %s)", self.group_id)
            while not stop.is_set():
                batch = await self._consumer.getmany(
                    timeout_ms=self.settings.worker.poll_timeout_ms, max_records=self.settings.worker.max_batch_records
                )
                async with self.lock:
                    await self._cycle(batch)

    async def _serve_web(self, view: BudgetView) -> Any:
        from budgetflow.streams.aggregate.stats import stats_app

        runner = await serve(
            stats_app(self, view), self.settings.web.host, self.settings.web.port, "BUDGETFLOW_WEB__PORT"
        )
        port = runner.addresses[0][1]
        template = self.settings.web.advertised_url or "http://127.0.0.1:{port}"
        self.url = template.replace("{port}", str(port))
        log.info("stats API on %s (port %d)", self.url, port)
        return runner

    @property
    def ready(self) -> bool:
        """Partitions restored and caught up, policies read: what /healthz reports."""
        return bool(self.ledgers) and not self._catch_up and self.policies.ready.is_set()

    @property
    def catching_up(self) -> list[int]:
        return sorted(self._catch_up)

    def _close_stores(self) -> None:
        for ledger in self.ledgers.values():
            ledger.store.close()
        for ledger, _ in self._parked.values():
            ledger.store.close()
        self.ledgers.clear()
        self._parked.clear()

    # -- partitions ---------------------------------------------------------------
    async def revoke(self, partitions: list[int]) -> None:
        log.info("partitions revoked: %s", partitions)
        async with self.lock:
            crash_point("aggregate.on_revoke")
            for p in partitions:
                ledger = self.ledgers.pop(p, None)
                if ledger is not None:
                    # Kept aside: if the partition comes back and nobody wrote its changelog
                    # meanwhile, its state is still exact and needs no restore.
                    self._parked[p] = (ledger, self._changelog_end.get(p, -1))
                    self.publisher.forget(ledger.budgets())
                self._catch_up.pop(p, None)

    async def assign(self, partitions: list[int]) -> None:
        log.info("partitions assigned: %s", partitions)
        async with self.lock:
            crash_point("aggregate.on_assign")
            for p in partitions:
                ledger, restored = await self._recover(p)
                self.ledgers[p] = ledger
                tp = TopicPartition(self.topics.ledger.name, p)
                assert self._restorer is not None
                assert self._consumer is not None
                end = (await self._restorer.end_offsets([tp]))[tp]
                committed = await self._consumer.committed(tp) if restored else None
                self._catch_up[p] = (end, committed)
            for p in list(self._parked):
                if p not in self.ledgers:
                    self._parked.pop(p)[0].store.close()

    def _store(self, partition: int) -> Store:
        if self.settings.worker.store == "memory":
            return MemoryStore()
        path = Path(self.settings.data_dir) / "aggregate" / self.group_id / f"state-{partition}"
        return RocksStore(path)

    async def _recover(self, partition: int) -> tuple[PartitionLedger, bool]:
        """State of a partition: the local store brought up to the changelog's end (and whether it was restored)."""
        assert self._restorer is not None
        tp = TopicPartition(self.topics.state.name, partition)
        end = (await self._restorer.end_offsets([tp]))[tp]
        parked = self._parked.pop(partition, None)
        if parked is not None and parked[1] == end - 1:
            log.info("partition %d kept: nobody wrote its changelog while it was away", partition)
            return parked[0], False
        if parked is not None:
            parked[0].store.close()
        began = time.monotonic()
        store = self._store(partition)
        if store.identity != self.identity or store.checkpoint >= end:
            # A new broker, a recreated changelog, or a store from elsewhere: start afresh.
            store.reset(self.identity)
        elif store.checkpoint >= 0 and not await checkpoint_resumable(
            self._restorer, tp, store.checkpoint, int(self.topics.state.config["delete.retention.ms"])
        ):
            # Older than the changelog keeps tombstones: a deletion it missed may be gone, so resuming could
            # resurrect a swept request or a dropped month. Restore it all.
            log.warning(
                "partition %d: the local store is older than the changelog's tombstones; restoring it all", partition
            )
            store.reset(self.identity)
        restored = 0
        if end > store.checkpoint + 1:
            self._restorer.assign([tp])
            self._restorer.seek(tp, store.checkpoint + 1)
            while await self._restorer.position(tp) < end:
                batch = await self._restorer.getmany(tp, timeout_ms=1000, max_records=20_000)
                records = batch.get(tp, [])
                if records:
                    store.write({r.key: r.value for r in records}, checkpoint=records[-1].offset)
                    restored += len(records)
            self._restorer.unsubscribe()
        self._changelog_end[partition] = end - 1
        ledger = PartitionLedger(partition, store, self.config, self.policies.policy_for)
        ledger.refresh_all()
        log.info(
            "partition %d ready: %d changelog records restored in %.2f s", partition, restored, time.monotonic() - began
        )
        return ledger, True

    def _policy_changed(self, budget: str) -> None:
        self._policy_changes.add(budget)

    # -- the cycle ------------------------------------------------------------------
    async def _cycle(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        assert self._producer is not None
        assert self._consumer is not None
        dead: list[DeadLetter] = []
        offsets: dict[TopicPartition, int] = {}
        if batch and self.first_batch_at is None:
            self.first_batch_at = time.perf_counter()
        for tp, records in batch.items():
            ledger = self.ledgers.get(tp.partition)
            if ledger is None:
                continue  # revoked while this batch was in flight: the new owner has it
            half = len(records) // 2
            for index, record in enumerate(records):
                if index == half:
                    crash_point("aggregate.mid_batch")
                self._apply(ledger, tp, record, dead)
            offsets[tp] = records[-1].offset + 1
            self._last_record_ts[tp.partition] = records[-1].timestamp / 1000
            self._first_record_ts[tp.partition] = records[0].timestamp / 1000
            self.processed += len(records)
            self.metrics.records.labels("aggregate", "in").inc(len(records))
        self.dead_letters += len(dead)
        for (kind, outcome), count in self._outcomes.items():
            self.metrics.ledger_entries.labels(kind, outcome).inc(count)
        self._outcomes.clear()
        for letter in dead:
            self.metrics.dead_letters.labels("aggregate", letter.reason).inc()
        changed_policies, self._policy_changes = self._policy_changes, set()
        for budget in changed_policies:
            p = partition_for(budget, self.topics.ledger.partitions)
            if p in self.ledgers:
                self.ledgers[p].refresh_policy(budget)
        crash_point("aggregate.after_apply")

        changelog: dict[int, list[tuple[Awaitable[Any], int]]] = {}
        writes: dict[int, list[tuple[bytes, bytes | None]]] = {}
        outgoing: list[Outgoing] = []
        assigned = {tp.partition for tp in self._consumer.assignment()}
        for p in [p for p in self.ledgers if p not in assigned]:
            # The group moved this partition without telling us yet (we stalled): write
            # nothing more for it; its new owner restores from the changelog.
            log.warning("partition %d is no longer assigned; dropping its unwritten changes", p)
            self.ledgers.pop(p).store.close()
            offsets.pop(TopicPartition(self.topics.ledger.name, p), None)
        for p, ledger in self.ledgers.items():
            changes = ledger.drain()
            if changes:
                writes[p] = changes
                changelog[p] = await self._send_changelog(p, changes)
            transitions, touched, rollover = ledger.take_outputs()
            for transition in transitions:
                self.metrics.budget_events.labels(transition.event).inc()
            if ledger.expirations:
                self.metrics.expired.inc(ledger.expirations)
                ledger.expirations = 0
            owned_policies = [b for b in changed_policies if partition_for(b, self.topics.ledger.partitions) == p]
            known = [b for b in self.policies.budgets() if partition_for(b, self.topics.ledger.partitions) == p]
            published = self.publisher.after_batch(ledger, transitions, touched, rollover, owned_policies, known)
            first = self._first_record_ts.pop(p, None)
            if first is not None:
                now = time.time()
                for item in published:
                    if item.role == "status":
                        self.metrics.propagation.observe(max(0.0, now - first))
            outgoing += published
            outgoing += self.publisher.refresh(ledger)
            if p in self._heartbeat_due:
                outgoing.append(self.publisher.heartbeat(ledger, self._lag_s(p), None, self.url))
        self._heartbeat_due.clear()
        outgoing += await self._caught_up_republish()
        others = [await self._send(o) for o in outgoing]
        self.metrics.records.labels("aggregate", "out").inc(len(outgoing) + len(dead))
        for letter in dead:
            others.append(await send_dead_letter(self._producer, self.topics.dlq.name, letter))
        results = {
            p: list(zip(await asyncio.gather(*(f for f, _ in batches)), (n for _, n in batches), strict=True))
            for p, batches in changelog.items()
        }
        await asyncio.gather(*others)
        crash_point("aggregate.after_flush")
        for p, changes in writes.items():
            last = max(int(meta.offset) + count - 1 for meta, count in results[p])
            self._changelog_end[p] = last
            if p in self.ledgers:
                self.ledgers[p].store.write(dict(changes), checkpoint=last)
        crash_point("aggregate.before_commit")
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as exc:
                log.warning("commit failed (%s); the next owner replays these entries", exc.__class__.__name__)

    def _apply(
        self, ledger: PartitionLedger, tp: TopicPartition, record: ConsumerRecord, dead: list[DeadLetter]
    ) -> None:
        def letter(reason: str, message: str) -> None:
            dead.append(
                DeadLetter.of_record(
                    "aggregate",
                    reason,
                    message,
                    tp.topic,
                    tp.partition,
                    record.offset,
                    record.key,
                    record.value,
                    keep_raw=self.settings.dlq.keep_raw,
                )
            )

        try:
            entry = decode_fast(LedgerEntry, record.value)
        except InvalidEvent as exc:
            letter(exc.reason, str(exc))
            return
        max_time = self.clock.tick_bound(record.timestamp, self.settings.max_clock_skew_s)
        try:
            outcome = ledger.apply(entry, record.offset, max_time=max_time)
        except Exception as exc:  # a defect must not stop the partition on one record
            log.exception(
                "ledger failed on %s[%d]@%d; dead-lettered as internal", tp.topic, tp.partition, record.offset
            )
            letter("internal", f"the ledger failed: {exc.__class__.__name__}")
            return
        key = (entry.kind, outcome)
        self._outcomes[key] = self._outcomes.get(key, 0) + 1
        if outcome in _LATE_MESSAGES:
            self.metrics.late.labels(outcome.removeprefix("late_")).inc()
            letter("late", _LATE_MESSAGES[outcome])
        elif outcome == "out_of_range":
            letter("out_of_range", _OUT_OF_RANGE)
        elif outcome == "tick":
            self._heartbeat_due.add(tp.partition)
            self._sample(ledger)

    async def _send_changelog(
        self, partition: int, changes: list[tuple[bytes, bytes | None]]
    ) -> list[tuple[Awaitable[Any], int]]:
        """Send a partition's changes in order, as whole batches (one producer, one partition: order is kept)."""
        if len(changes) > 1 and crash_due("aggregate.mid_changelog"):
            # Make a prefix of the batch durable, then die: the case the write order exists for.
            await asyncio.gather(*(f for f, _ in await self._send_batches(partition, changes[: len(changes) // 2])))
            crash_now()
        return await self._send_batches(partition, changes)

    async def _send_batches(
        self, partition: int, changes: list[tuple[bytes, bytes | None]]
    ) -> list[tuple[Awaitable[Any], int]]:
        """(future, records) per batch; a batch's metadata carries its first record's offset."""
        assert self._producer is not None
        topic = self.topics.state.name
        futures = []
        index = 0
        while index < len(changes):
            batch = self._producer.create_batch()
            start = index
            while index < len(changes):
                key, value = changes[index]
                if batch.append(key=key, value=value, timestamp=None) is None:
                    break
                index += 1
            if index == start:
                raise ValueError(f"a state record of {len(changes[index][0])} bytes does not fit in a batch")
            futures.append((await self._producer.send_batch(batch, topic, partition=partition), index - start))
        return futures

    async def _send(self, item: Outgoing) -> Awaitable[Any]:
        assert self._producer is not None
        topic = {"status": self.topics.status, "events": self.topics.events, "heartbeats": self.topics.heartbeats}
        return await self._producer.send(topic[item.role].name, key=item.key, value=item.value)  # type: ignore[no-any-return]

    async def _caught_up_republish(self) -> list[Outgoing]:
        """After a partition is recovered and caught up, publish its budgets once (and re-announce events)."""
        assert self._consumer is not None
        out: list[Outgoing] = []
        for p, (end, committed) in list(self._catch_up.items()):
            ledger = self.ledgers.get(p)
            if ledger is None:
                self._catch_up.pop(p)
                continue
            tp = TopicPartition(self.topics.ledger.name, p)
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue
            if position < end:
                continue
            self._catch_up.pop(p)
            known = {b for b in self.policies.budgets() if partition_for(b, self.topics.ledger.partitions) == p}
            current = self.publisher.current_period(ledger)
            out += self.publisher.refresh(ledger, set(ledger.budgets()) | known)
            if committed is not None:
                # Transitions of entries past the committed offset may not have been announced
                # before a crash: announce them again (keyed budget:period:event, so consumers dedupe).
                out += self.publisher.events_of(ledger, current, since_offset=committed)
        return out

    def _published(self, reason: str) -> None:
        self.metrics.statuses.labels(reason).inc()

    def _sample(self, ledger: PartitionLedger) -> None:
        """Feed the forecaster each current-period budget's spend, once per sample interval of stream time."""
        t = ledger.meta.stream_time
        if t - self._sampled_at.get(ledger.partition, 0.0) < self.settings.forecast.sample_s:
            return
        self._sampled_at[ledger.partition] = t
        current = self.publisher.current_period(ledger)
        start = month_start(current).timestamp()
        for (budget, period), state in ledger.periods.items():
            if period == current:
                self.forecaster.sample((budget, period), t, state.spend, start)

    def forecast(self, ledger: PartitionLedger, budget: str, period: str) -> Forecast:
        """Where the budget's month will end, on this partition's stream time (or the clock, if later)."""
        state = ledger.period_state(budget, period)
        spend = state.spend if state is not None else 0
        limit = self.policies.policy_for(budget).monthly_limit_usd
        now = max(ledger.meta.stream_time, self.clock.now().timestamp())
        return self.forecaster.forecast(
            (budget, period), now, spend, limit, month_start(period).timestamp(), next_month_start(period).timestamp()
        )

    @staticmethod
    def period_end(period: str) -> float:
        return next_month_start(period).timestamp()

    def lag_records(self, partition: int) -> int | None:
        """Ledger records not yet applied on a partition (None before the first fetch)."""
        if self._consumer is None:
            return None
        highwater = self._consumer.highwater(TopicPartition(self.topics.ledger.name, partition))
        ledger = self.ledgers.get(partition)
        if highwater is None or ledger is None:
            return None
        return max(0, int(highwater) - ledger.meta.applied - 1)

    def _lag_s(self, partition: int) -> float:
        assert self._consumer is not None
        tp = TopicPartition(self.topics.ledger.name, partition)
        highwater = self._consumer.highwater(tp)
        last = self._last_record_ts.get(partition)
        ledger = self.ledgers.get(partition)
        if highwater is None or last is None or ledger is None or ledger.meta.applied + 1 >= highwater:
            return 0.0
        return max(0.0, time.time() - last)

    # -- time ---------------------------------------------------------------------------
    async def _ticker(self, stop: asyncio.Event) -> None:
        """Ticks into every owned ledger partition: time moves through the stream."""
        assert self._producer is not None
        assert self._consumer is not None
        while not stop.is_set():
            await asyncio.sleep(self.settings.heartbeat_s)
            now = self.clock.now()
            for p in list(self.ledgers):
                tp = TopicPartition(self.topics.ledger.name, p)
                highwater = self._consumer.highwater(tp)
                ledger = self.ledgers.get(p)
                applied = ledger.meta.applied if ledger is not None else -1
                backlog = None if highwater is None else highwater - applied - 1
                # Expire only while the backlog is small, so that usage sitting in it is not
                # pre-empted; the decision is written into the tick, so a replay decides alike.
                expire = backlog is not None and backlog <= self.settings.worker.expiry_max_lag_records
                tick = LedgerEntry(
                    entry_id=f"tick:{p}:{now.timestamp():.6f}",
                    kind="tick",
                    request_id="tick",
                    period=period_of(now),
                    amount_pico_usd=0,
                    occurred_at=now,
                    expire=expire,
                )
                try:
                    await self._producer.send(self.topics.ledger.name, key=b"tick", value=dumps(tick), partition=p)
                except KafkaError as exc:
                    log.warning("tick for partition %d not sent (%s)", p, exc.__class__.__name__)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """The aggregate role, run until ``stop``."""
    await AggregateWorker(settings, Topics.from_settings(settings), Clock(settings.clock)).run(stop)
