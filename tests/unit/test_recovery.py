"""The aggregate's recovery of a partition: a store older than the changelog keeps tombstones restores in full.

The changelog here is a stand-in with the three calls recovery makes of it (the rule itself,
``checkpoint_resumable``, is tested against a real broker in ``tests/integration/test_retention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndTimestamp

from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.settings import load_settings
from budgetflow.streams.aggregate.ledger import LedgerConfig
from budgetflow.streams.aggregate.records import PeriodState
from budgetflow.streams.aggregate.recovery import PartitionRecovery
from budgetflow.streams.aggregate.store import RocksStore
from budgetflow.streams.kafka.topics import Topics

KEY = b"p|team:x\x1f2026-11"


@dataclass
class Record:
    offset: int
    key: bytes
    value: bytes | None


class Changelog:
    """One changelog partition: its records, and the offset of the first one young enough to keep tombstones."""

    def __init__(self, records: list[Record], first_young: int | None) -> None:
        self.records = records
        self.first_young = first_young
        self.pos = 0

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, len(self.records))

    async def offsets_for_times(self, query: dict[TopicPartition, int]) -> dict[TopicPartition, Any]:
        young = None if self.first_young is None else OffsetAndTimestamp(self.first_young, 0)
        return dict.fromkeys(query, young)

    def assign(self, tps: list[TopicPartition]) -> None:
        pass

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.pos = offset

    async def position(self, tp: TopicPartition) -> int:
        return self.pos

    async def getmany(self, tp: TopicPartition, **_: Any) -> dict[TopicPartition, list[Record]]:
        batch, self.pos = self.records[self.pos :], len(self.records)
        return {tp: batch}

    def unsubscribe(self) -> None:
        pass


def period(settled: int) -> bytes:
    return PeriodState("team:x", "2026-11", settled=settled).encode()


@pytest.mark.parametrize(("first_young", "resumed"), [(0, True), (2, True), (3, False), (None, False)])
async def test_a_store_resumes_only_when_every_record_after_its_checkpoint_still_has_its_tombstones(
    tmp_path: Path, first_young: int | None, resumed: bool
) -> None:
    settings = load_settings(data_dir=tmp_path)
    recovery = PartitionRecovery(
        settings, Topics.from_settings(settings), LedgerConfig(), lambda b: BudgetPolicy(id=b), "aggregate"
    )
    recovery.identity = "cluster/state"
    # The changelog: the period written (0), changed (1), deleted (2), written again (3).
    records = [Record(0, KEY, period(5)), Record(1, KEY, period(7)), Record(2, KEY, None), Record(3, KEY, period(1))]
    # A store stopped at offset 1; since then the cleaner may have removed the tombstone at 2.
    path = tmp_path / "aggregate" / "aggregate" / "state-0"
    store = RocksStore(path)
    store.reset("cluster/state")
    store.write({KEY: period(7), b"r|team:x\x1fr1\x1f0": b'["2026-11",0,60,1,1,false,false,1]'}, checkpoint=1)
    store.close()
    recovery.restorer = Changelog(records, first_young)  # type: ignore[assignment]
    ledger, restored = await recovery.recover(0)
    try:
        assert restored
        assert ledger.periods[("team:x", "2026-11")].settled == 1
        # A record the changelog deleted (its tombstone possibly gone) survives only a resumed store.
        assert (ledger.store.get(b"r|team:x\x1fr1\x1f0") is not None) is resumed
    finally:
        ledger.store.close()


def recovery_of(tmp_path: Path, records: list[Record]) -> PartitionRecovery:
    settings = load_settings(data_dir=tmp_path, worker={"store": "memory"})
    recovery = PartitionRecovery(
        settings, Topics.from_settings(settings), LedgerConfig(), lambda b: BudgetPolicy(id=b), "aggregate"
    )
    recovery.identity = "cluster/state"
    recovery.restorer = Changelog(records, first_young=0)  # type: ignore[assignment]
    return recovery


async def test_a_partition_assigned_again_is_kept_only_when_nobody_wrote_its_changelog_meanwhile(
    tmp_path: Path,
) -> None:
    changelog = [Record(0, KEY, period(5))]
    recovery = recovery_of(tmp_path, changelog)
    ledger, restored = await recovery.recover(0)
    assert restored
    recovery.revoked(0, ledger)
    again, restored = await recovery.recover(0)
    assert again is ledger
    assert not restored
    recovery.revoked(0, again)
    changelog.append(Record(1, KEY, period(9)))  # another worker held the partition and wrote it
    third, restored = await recovery.recover(0)
    assert third is not ledger
    assert restored
    assert third.periods[("team:x", "2026-11")].settled == 9


class GroupConsumer:
    def __init__(self, position: int) -> None:
        self.at = position

    async def committed(self, tp: TopicPartition) -> int:
        return 1

    async def position(self, tp: TopicPartition) -> int:
        return self.at


async def test_a_recovered_partition_catches_up_at_the_ledger_end_as_of_its_assignment(tmp_path: Path) -> None:
    recovery = recovery_of(tmp_path, [Record(0, KEY, period(5)), Record(1, KEY, period(7))])  # its end: 2
    consumer = GroupConsumer(position=1)
    await recovery.start_catch_up(0, consumer, restored=True)  # type: ignore[arg-type]
    await recovery.start_catch_up(3, consumer, restored=False)  # type: ignore[arg-type]
    assert recovery.catching_up == [0, 3]
    assert await recovery.caught_up(consumer, owned={0}) == []  # type: ignore[arg-type]
    assert recovery.catching_up == [0], "a partition no longer owned no longer catches up"
    consumer.at = 2
    assert await recovery.caught_up(consumer, owned={0}) == [(0, 1)]  # type: ignore[arg-type]
    assert recovery.catching_up == []
