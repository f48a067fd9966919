"""A ledger partition's state when the group assigns it: kept, resumed from the local store, or restored.

The state of a partition is its local store brought up to the end of the partition's changelog. A partition
that comes back after a revocation, and whose changelog nobody wrote meanwhile, is kept as it was. Otherwise the
store resumes from its checkpoint when the changelog still holds every tombstone past it, and starts afresh when
it belongs to another broker or changelog, or is too old (docs/architecture.md, "Exactly once, and how it is
proven"). A recovered partition then catches up: until the worker's group consumer reaches the ledger's end as
of the assignment, the partition's statuses may be behind, and the worker is not ready.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.settings import Settings
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.store import MemoryStore, RocksStore, Store
from budgetflow.streams.kafka.topics import Topics, checkpoint_resumable

__all__ = ["PartitionRecovery"]

log = logging.getLogger(__name__)


class PartitionRecovery:
    """Recovers the partitions a worker is assigned, and keeps aside the ones revoked from it.

    ``identity`` names the broker and changelog the stores belong to; ``restorer`` is a started consumer without a
    group that reads the changelog (and end offsets).
    """

    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        config: LedgerConfig,
        policy_for: Callable[[str], BudgetPolicy],
        group_id: str,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.config = config
        self.policy_for = policy_for
        self.group_id = group_id
        self.identity = ""
        self.restorer: AIOKafkaConsumer | None = None
        self.changelog_end: dict[int, int] = {}  # the last changelog offset each partition's state reflects
        self._parked: dict[int, tuple[PartitionLedger, int]] = {}  # revoked: (its state, its changelog end then)
        self._catch_up: dict[int, tuple[int, int | None]] = {}  # recovered: (ledger end then, committed if restored)

    @property
    def catching_up(self) -> list[int]:
        """The partitions recovered whose group consumer has not yet reached the ledger's end as of their assignment."""
        return sorted(self._catch_up)

    async def end_offset(self, topic: str, partition: int) -> int:
        assert self.restorer is not None
        tp = TopicPartition(topic, partition)
        return int((await self.restorer.end_offsets([tp]))[tp])

    def revoked(self, partition: int, ledger: PartitionLedger | None) -> None:
        """A partition was revoked: it no longer catches up, and its state (if any) is kept aside. If it comes back
        and nobody wrote its changelog meanwhile, its state is still exact and needs no restore."""
        if ledger is not None:
            self._parked[partition] = (ledger, self.changelog_end.get(partition, -1))
        self._catch_up.pop(partition, None)

    def close_parked(self, keep: Iterable[int] = ()) -> None:
        """Close the stores of parked partitions, except those in ``keep``."""
        kept = set(keep)
        for partition in [p for p in self._parked if p not in kept]:
            self._parked.pop(partition)[0].store.close()

    async def recover(self, partition: int) -> tuple[PartitionLedger, bool]:
        """State of a partition: the local store brought up to the changelog's end (and whether it was restored)."""
        tp = TopicPartition(self.topics.state.name, partition)
        end = await self.end_offset(tp.topic, partition)
        parked = self._parked.pop(partition, None)
        if parked is not None and parked[1] == end - 1:
            log.info("partition %d kept: nobody wrote its changelog while it was away", partition)
            return parked[0], False
        if parked is not None:
            parked[0].store.close()
        began = time.monotonic()
        store = self._store(partition)
        await self._start_afresh_if_unusable(store, tp, end)
        restored = await self._restore(store, tp, end)
        self.changelog_end[partition] = end - 1
        ledger = PartitionLedger(partition, store, self.config, self.policy_for)
        ledger.refresh_all()
        log.info(
            "partition %d ready: %d changelog records restored in %.2f s", partition, restored, time.monotonic() - began
        )
        return ledger, True

    async def start_catch_up(self, partition: int, consumer: AIOKafkaConsumer, restored: bool) -> None:
        """Note where a recovered partition will be caught up: the ledger's end now. When its state was restored,
        note its committed offset too: transitions of entries past it may never have been announced."""
        tp = TopicPartition(self.topics.ledger.name, partition)
        end = await self.end_offset(tp.topic, partition)
        committed = await consumer.committed(tp) if restored else None
        self._catch_up[partition] = (end, committed)

    async def caught_up(self, consumer: AIOKafkaConsumer, owned: Collection[int]) -> list[tuple[int, int | None]]:
        """The partitions that have just caught up, each with its committed offset noted at assignment (None when
        its state was not restored); a partition no longer ``owned`` is forgotten."""
        done: list[tuple[int, int | None]] = []
        for p, (end, committed) in list(self._catch_up.items()):
            if p not in owned:
                self._catch_up.pop(p)
                continue
            try:
                position = await consumer.position(TopicPartition(self.topics.ledger.name, p))
            except KafkaError:
                continue
            if position < end:
                continue
            self._catch_up.pop(p)
            done.append((p, committed))
        return done

    def _store(self, partition: int) -> Store:
        if self.settings.worker.store == "memory":
            return MemoryStore()
        return RocksStore(Path(self.settings.data_dir) / "aggregate" / self.group_id / f"state-{partition}")

    async def _start_afresh_if_unusable(self, store: Store, tp: TopicPartition, end: int) -> None:
        assert self.restorer is not None
        if store.identity != self.identity or store.checkpoint >= end:
            # A new broker, a recreated changelog, or a store from elsewhere: start afresh.
            store.reset(self.identity)
        elif store.checkpoint >= 0 and not await checkpoint_resumable(
            self.restorer, tp, store.checkpoint, int(self.topics.state.config["delete.retention.ms"])
        ):
            # Older than the changelog keeps tombstones: a deletion it missed may be gone, so resuming could
            # resurrect a swept request or a dropped month. Restore it all.
            log.warning(
                "partition %d: the local store is older than the changelog's tombstones; restoring it all", tp.partition
            )
            store.reset(self.identity)

    async def _restore(self, store: Store, tp: TopicPartition, end: int) -> int:
        """Write the changelog from the store's checkpoint to ``end`` into the store; how many records it read."""
        assert self.restorer is not None
        restored = 0
        if end > store.checkpoint + 1:
            self.restorer.assign([tp])
            self.restorer.seek(tp, store.checkpoint + 1)
            while await self.restorer.position(tp) < end:
                batch = await self.restorer.getmany(tp, timeout_ms=1000, max_records=20_000)
                records = batch.get(tp, [])
                if records:
                    store.write({r.key: r.value for r in records}, checkpoint=records[-1].offset)
                    restored += len(records)
            self.restorer.unsubscribe()
        return restored
