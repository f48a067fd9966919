"""The aggregate worker: owns ledger partitions, keeps their exact state, publishes statuses.

One cycle, in the order that makes a crash anywhere safe (docs/architecture.md, "Exactly once, and how it is
proven"): apply a batch of ledger entries to each partition's :class:`PartitionLedger`; send each partition's
changes to its changelog partition (in the ledger's crash-safe order, one idempotent producer); send statuses,
transition events, heartbeats and dead letters; wait until the broker has all of it; write the local stores; and
only then commit the ledger offsets. A crash anywhere replays from the committed offsets onto state that may be
ahead of them, which the ledger's idempotence absorbs.

The worker serves no HTTP and registers no gauges of its own: the role (:mod:`budgetflow.streams.aggregate.role`)
wires the stats API and the collector to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from budgetflow.schemas.settings import Settings
from budgetflow.streams.aggregate.changes import Changes
from budgetflow.streams.aggregate.entries import EntryApplier
from budgetflow.streams.aggregate.forecasts import BudgetForecasts
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.recovery import PartitionRecovery
from budgetflow.streams.aggregate.statuses import Outgoing, StatusPublisher
from budgetflow.streams.aggregate.ticks import Ticker
from budgetflow.streams.gateway.view import BudgetView
from budgetflow.streams.kafka.batches import SentBatch, commit_offsets, last_offset, send_in_batches
from budgetflow.streams.kafka.clients import client_options, group_consumer
from budgetflow.streams.kafka.dlq import DeadLetter, send_dead_letter
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now, partition_for
from budgetflow.streams.rules.clock import Clock
from budgetflow.streams.rules.policies import PolicyBook
from budgetflow.streams.service.crash import crash_due, crash_now, crash_point
from budgetflow.streams.service.http import serve
from budgetflow.streams.service.metrics import PipelineMetrics

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["AggregateWorker"]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class _ChangelogWrite:
    """One partition's changes of a cycle, handed to the producer."""

    changes: Changes
    sent: list[SentBatch]


class AggregateWorker:
    """Consumes the ledger; state per partition; statuses, events and heartbeats out.

    ``web_app``, when given, makes the HTTP application the worker serves on ``WEB__PORT`` from its view.
    """

    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        clock: Clock,
        *,
        web_app: Callable[[BudgetView], web.Application] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.clock = clock
        self.web_app = web_app
        self.group_id = f"{settings.topics.prefix}aggregate"
        self.config = LedgerConfig.from_settings(settings)
        self.ledgers: dict[int, PartitionLedger] = {}
        self.lock = asyncio.Lock()
        self._policy_changes: set[str] = set()
        self.metrics = PipelineMetrics()
        self.policies = PolicyBook(
            settings, topics.policies.name, self._policy_changed, self.metrics.policy_skipped.inc
        )
        self.metrics.start_counters("aggregate")
        self.forecasts = BudgetForecasts(settings.forecast, clock, self.policies.policy_for)
        self.publisher = StatusPublisher(
            self.config.rules,
            self.policies.policy_for,
            clock.now,
            settings.status.refresh_s,
            forecast=self.forecasts.forecast,
            on_publish=self._published,
        )
        self.entries = EntryApplier(settings, clock, self.metrics)
        self.recovery = PartitionRecovery(settings, topics, self.config, self.policies.policy_for, self.group_id)
        self._heartbeat_due: set[int] = set()
        self._last_record_ts: dict[int, float] = {}
        self._first_record_ts: dict[int, float] = {}
        self.processed = 0
        self.first_batch_at: float | None = None  # perf_counter of the first records (benchmarks)
        self.url: str | None = None
        self.view: BudgetView | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None

    # -- life cycle ---------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        options = client_options(self.settings.kafka)
        cluster_id = await ensure_topics_now(self.settings, self.topics)
        self.recovery.identity = f"{cluster_id}/{self.topics.state.name}"
        async with contextlib.AsyncExitStack() as stack:
            consumer = await self._start(stack, options, stop)
            log.info("aggregate worker started (group %s)", self.group_id)
            while not stop.is_set():
                batch = await consumer.getmany(
                    timeout_ms=self.settings.worker.poll_timeout_ms, max_records=self.settings.worker.max_batch_records
                )
                async with self.lock:
                    await self._cycle(batch)

    async def _start(
        self, stack: contextlib.AsyncExitStack, options: dict[str, Any], stop: asyncio.Event
    ) -> AIOKafkaConsumer:
        """Start the clients, the view, the web app and the ticker, each stopped by ``stack``; the group consumer."""
        self._producer = AIOKafkaProducer(
            **options, enable_idempotence=True, acks="all", linger_ms=2, max_batch_size=512 * 1024
        )
        await self._producer.start()
        stack.push_async_callback(self._producer.stop)
        # earliest: a restore that starts below the log start (records deleted by an operator) reads what is left
        restorer = AIOKafkaConsumer(
            **options, enable_auto_commit=False, max_partition_fetch_bytes=4 << 20, auto_offset_reset="earliest"
        )
        self.recovery.restorer = restorer
        await restorer.start()
        stack.push_async_callback(restorer.stop)
        stack.push_async_callback(self.policies.stop)
        await self.policies.start()
        self._consumer = group_consumer(
            self.settings.kafka, self.group_id, max_poll_records=self.settings.worker.max_batch_records
        )
        self._consumer.subscribe([self.topics.ledger.name], listener=_Rebalance(self))
        await self._consumer.start()
        stack.push_async_callback(self._consumer.stop)
        stack.callback(self._close_stores)
        self.view = BudgetView(self.settings, clock=self.clock)
        await self.view.start()
        stack.push_async_callback(self.view.stop)
        if self.web_app is not None:
            runner = await self._serve_web(self.web_app(self.view))
            stack.push_async_callback(runner.cleanup)
        ticker = Ticker(
            self.settings, self.clock, self.topics.ledger.name, self.ledgers, self._producer, self._consumer
        )
        stack.push_async_callback(_cancel, asyncio.create_task(ticker.run(stop), name="ticker"))
        return self._consumer

    async def _serve_web(self, app: web.Application) -> web.AppRunner:
        runner = await serve(app, self.settings.web.host, self.settings.web.port, "BUDGETFLOW_WEB__PORT")
        port = runner.addresses[0][1]
        template = self.settings.web.advertised_url or "http://127.0.0.1:{port}"
        self.url = template.replace("{port}", str(port))
        log.info("stats API on %s (port %d)", self.url, port)
        return runner

    @property
    def ready(self) -> bool:
        """Partitions restored and caught up, policies read: what /healthz reports."""
        return bool(self.ledgers) and not self.recovery.catching_up and self.policies.ready.is_set()

    @property
    def catching_up(self) -> list[int]:
        return self.recovery.catching_up

    def _close_stores(self) -> None:
        for ledger in self.ledgers.values():
            ledger.store.close()
        self.recovery.close_parked()
        self.ledgers.clear()

    # -- partitions ---------------------------------------------------------------
    async def revoke(self, partitions: list[int]) -> None:
        log.info("partitions revoked: %s", partitions)
        async with self.lock:
            crash_point("aggregate.on_revoke")
            for p in partitions:
                ledger = self.ledgers.pop(p, None)
                self.recovery.revoked(p, ledger)
                if ledger is not None:
                    self.publisher.forget(ledger.budgets())

    async def assign(self, partitions: list[int]) -> None:
        log.info("partitions assigned: %s", partitions)
        async with self.lock:
            crash_point("aggregate.on_assign")
            assert self._consumer is not None
            for p in partitions:
                ledger, restored = await self.recovery.recover(p)
                self.ledgers[p] = ledger
                await self.recovery.start_catch_up(p, self._consumer, restored)
            self.recovery.close_parked(keep=self.ledgers)

    def _policy_changed(self, budget: str) -> None:
        self._policy_changes.add(budget)

    def _partition_of(self, budget: str) -> int:
        return partition_for(budget, self.topics.ledger.partitions)

    # -- the cycle ------------------------------------------------------------------
    async def _cycle(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """One batch, in the order that makes a crash anywhere safe (the module docstring)."""
        assert self._consumer is not None
        offsets, dead = self._apply_batch(batch)
        changed_policies = self._apply_policy_changes()
        crash_point("aggregate.after_apply")
        self._drop_unassigned(offsets)
        changelog = await self._send_changelog()
        outgoing = self._outputs(changed_policies) + await self._caught_up_republish()
        others = await self._send_outputs(outgoing, dead)
        ends = {p: await last_offset(write.sent) for p, write in changelog.items()}  # the broker has the changes
        await asyncio.gather(*others)
        crash_point("aggregate.after_flush")
        self._checkpoint(changelog, ends)
        crash_point("aggregate.before_commit")
        await commit_offsets(self._consumer, offsets, "the next owner replays these entries")

    def _apply_batch(
        self, batch: dict[TopicPartition, list[ConsumerRecord]]
    ) -> tuple[dict[TopicPartition, int], list[DeadLetter]]:
        """Apply each owned partition's records to its ledger: the offsets to commit, and the dead letters."""
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
                result, letter = self.entries.apply(ledger, tp, record)
                if letter is not None:
                    dead.append(letter)
                if result == "tick":
                    self._heartbeat_due.add(tp.partition)
                    self.forecasts.sample(ledger, self.publisher.current_period(ledger))
            offsets[tp] = records[-1].offset + 1
            self._last_record_ts[tp.partition] = records[-1].timestamp / 1000
            self._first_record_ts[tp.partition] = records[0].timestamp / 1000
            self.processed += len(records)
            self.metrics.records.labels("aggregate", "in").inc(len(records))
        self.entries.count(dead)
        return offsets, dead

    def _apply_policy_changes(self) -> set[str]:
        """Re-evaluate the statuses of the budgets whose policy changed since the last cycle; those budgets."""
        changed, self._policy_changes = self._policy_changes, set()
        for budget in changed:
            p = self._partition_of(budget)
            if p in self.ledgers:
                self.ledgers[p].refresh_policy(budget)
        return changed

    def _drop_unassigned(self, offsets: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        assigned = {tp.partition for tp in self._consumer.assignment()}
        for p in [p for p in self.ledgers if p not in assigned]:
            # The group moved this partition without telling us yet (we stalled): write
            # nothing more for it; its new owner restores from the changelog.
            log.warning("partition %d is no longer assigned; dropping its unwritten changes", p)
            self.ledgers.pop(p).store.close()
            offsets.pop(TopicPartition(self.topics.ledger.name, p), None)

    async def _send_changelog(self) -> dict[int, _ChangelogWrite]:
        """Hand each partition's changes to the producer, in the ledger's order (the broker has them later)."""
        writes: dict[int, _ChangelogWrite] = {}
        for p, ledger in self.ledgers.items():
            changes = ledger.drain()
            if not changes:
                continue
            if len(changes) > 1 and crash_due("aggregate.mid_changelog"):
                # Make a prefix of the batch durable, then die: the case the write order exists for.
                await last_offset(await self._send_changes(p, changes[: len(changes) // 2]))
                crash_now()
            writes[p] = _ChangelogWrite(changes, await self._send_changes(p, changes))
        return writes

    async def _send_changes(self, partition: int, changes: Changes) -> list[SentBatch]:
        assert self._producer is not None
        return await send_in_batches(self._producer, self.topics.state.name, partition, changes)

    def _checkpoint(self, changelog: dict[int, _ChangelogWrite], ends: dict[int, int]) -> None:
        """Write each partition's changes to its local store, at the changelog offset they reach."""
        for p, write in changelog.items():
            self.recovery.changelog_end[p] = ends[p]
            if p in self.ledgers:
                self.ledgers[p].store.write(dict(write.changes), checkpoint=ends[p])

    # -- what a cycle publishes ----------------------------------------------------------
    def _outputs(self, changed_policies: set[str]) -> list[Outgoing]:
        outgoing: list[Outgoing] = []
        for p, ledger in self.ledgers.items():
            outgoing += self._outputs_of(p, ledger, changed_policies)
        self._heartbeat_due.clear()
        return outgoing

    def _outputs_of(self, p: int, ledger: PartitionLedger, changed_policies: set[str]) -> list[Outgoing]:
        """One partition's transition events and statuses, statuses due a refresh, and its heartbeat after a tick."""
        changes, touched, rollover = ledger.take_outputs()
        for change in changes:
            self.metrics.budget_events.labels(change.event).inc()
        if ledger.expirations:
            self.metrics.expired.inc(ledger.expirations)
            ledger.expirations = 0
        owned_policies = [b for b in changed_policies if self._partition_of(b) == p]
        known = [b for b in self.policies.budgets() if self._partition_of(b) == p]
        published = self.publisher.after_batch(ledger, changes, touched, rollover, owned_policies, known)
        first = self._first_record_ts.pop(p, None)
        if first is not None:
            now = time.time()
            for item in published:
                if item.role == "status":
                    self.metrics.propagation.observe(max(0.0, now - first))
        out = (
            published
            + self.publisher.refresh(ledger)
            + self.publisher.grants(ledger)
            + _partials(ledger.take_partials())
        )
        if p in self._heartbeat_due:
            out.append(self.publisher.heartbeat(ledger, self._lag_s(p), None, self.url))
        return out

    async def _caught_up_republish(self) -> list[Outgoing]:
        """After a partition is recovered and caught up, publish its budgets once (and re-announce events)."""
        assert self._consumer is not None
        out: list[Outgoing] = []
        for p, committed in await self.recovery.caught_up(self._consumer, self.ledgers):
            ledger = self.ledgers[p]
            known = {b for b in self.policies.budgets() if self._partition_of(b) == p}
            current = self.publisher.current_period(ledger)
            out += self.publisher.refresh(ledger, set(ledger.budgets()) | known) + _partials(ledger.partials())
            if committed is not None:
                # Transitions of entries past the committed offset may not have been announced
                # before a crash: announce them again (keyed budget:period:event, so consumers dedupe).
                out += self.publisher.events_of(ledger, current, since_offset=committed)
        return out

    async def _send_outputs(self, outgoing: list[Outgoing], dead: list[DeadLetter]) -> list[Awaitable[Any]]:
        """Hand statuses, events, heartbeats and dead letters to the producer; the broker's answers to come."""
        assert self._producer is not None
        topic = {
            "status": self.topics.status,
            "events": self.topics.events,
            "heartbeats": self.topics.heartbeats,
            "leases": self.topics.leases,
            "ledger": self.topics.ledger,
        }
        sent = [
            await self._producer.send(
                topic[o.role].name,
                key=o.key,
                value=o.value,
                partition=self._partition_of(o.key.decode()) if o.role == "ledger" else None,
            )
            for o in outgoing
        ]
        self.metrics.records.labels("aggregate", "out").inc(len(outgoing) + len(dead))
        for letter in dead:
            sent.append(await send_dead_letter(self._producer, self.topics.dlq.name, letter))
        return sent

    def _published(self, reason: str) -> None:
        self.metrics.statuses.labels(reason).inc()

    # -- lag ------------------------------------------------------------------------------
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
        highwater = self._consumer.highwater(TopicPartition(self.topics.ledger.name, partition))
        last = self._last_record_ts.get(partition)
        ledger = self.ledgers.get(partition)
        if highwater is None or last is None or ledger is None or ledger.meta.applied + 1 >= highwater:
            return 0.0
        return max(0.0, time.time() - last)


def _partials(entries: list[tuple[str, bytes]]) -> list[Outgoing]:
    """Shards' sums for their budgets' home partitions (:mod:`budgetflow.streams.aggregate.shardsums`)."""
    return [Outgoing("ledger", home.encode(), value) for home, value in entries]
