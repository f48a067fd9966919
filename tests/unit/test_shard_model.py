"""A model-based test of sharded budgets: shards on their own partitions, their sums merged at home, crashes at
every write point of every partition, against one unsharded ledger fed the same entries.

Hypothesis writes random histories: reserves and settles of a hot budget (``team:hot``, 3 shards) and of an
ordinary one, duplicates, ticks that expire reservations. Each entry goes to its shard's partition as enrich
sends it (``team:hot#k``, ``k`` from the request id); the reference, a :class:`PartitionLedger` without shards
and without crashes, gets every entry in the same order relative to the ticks (the plain reference model of
``test_ledger_model`` holds that ledger to the rules). Each partition applies batches and may crash after any
of its writes, resuming from a committed offset that lags; a shard's batch sends its partial entries home (or
crashes before they are sent), and an old partial may reach home again after later ones, as from a worker that
lost the partition in a rebalance. Whenever every log has been applied (``quiesce``):

* the home's merged sums and request count equal the reference's, to the pico-dollar;
* with no hysteresis a status depends on spend alone, so the home's status equals the reference's;
* the merged covers never claim more than the reference counted.

``BUDGETFLOW_MODEL_EXAMPLES=2000 .venv/bin/pytest tests/unit/test_shard_model.py --timeout=0`` draws new histories (CI runs 400 fixed ones).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from budgetflow.schemas.events import LedgerEntry, entry_id, period_of
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.serde import decode
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.store import MemoryStore
from budgetflow.streams.rules.shards import account
from budgetflow.streams.rules.status import StatusRules

EXAMPLES = int(os.environ.get("BUDGETFLOW_MODEL_EXAMPLES", "400"))
START = datetime(2026, 11, 30, 22, tzinfo=UTC).timestamp()  # close to a month boundary
SHARDS = 3
HOT, COLD = "team:hot", "team:cold"
CONFIG = LedgerConfig(
    horizon_s=7200,
    grace_s=86400,
    default_ttl_s=600,
    sweep_keys_per_tick=3,
    sweep_interval_s=300,
    rules=StatusRules(hysteresis_points=Decimal(0)),
)
POLICIES = {
    HOT: BudgetPolicy(id=HOT, monthly_limit_usd="1", soft_limit_percent=50, shards=SHARDS),  # type: ignore[arg-type]
    COLD: BudgetPolicy(id=COLD, monthly_limit_usd="1"),  # type: ignore[arg-type]
}
# Up to 40 % of the limit per entry: months cross the soft and hard limits within a few entries.
AMOUNTS = st.one_of(st.integers(0, 4 * 10**11), st.sampled_from([0, 1, 10**12]))
REQUESTS = tuple(f"r{i}" for i in range(8))


def policy_for(budget: str) -> BudgetPolicy:
    return POLICIES.get(budget) or BudgetPolicy(id=budget)


class Partition:
    """One ledger partition: its log, its store, the ledger under test, and where it resumes."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.log: list[tuple[LedgerEntry, float]] = []
        self.store = MemoryStore()
        self.ledger = self._load()
        self.position = 0

    def _load(self) -> PartitionLedger:
        ledger = PartitionLedger(self.number, self.store, CONFIG, policy_for)
        ledger.refresh_all()
        return ledger

    def batch(self, size: int, crash: int | None, lag: int) -> list[tuple[str, bytes]]:
        """Apply a batch and write its changes; the partial entries it sends home (none if it crashed first)."""
        end = min(self.position + size, len(self.log))
        for offset in range(self.position, end):
            e, broker_time = self.log[offset]
            event(f"outcome: {e.kind} {self.ledger.apply(e, offset, max_time=broker_time + 300)}")
        changes = self.ledger.drain()
        self.ledger.take_outputs()
        partials = self.ledger.take_partials()
        if crash is not None:
            self.store.write(dict(changes[: min(crash, len(changes))]), checkpoint=end - 1)
            self.ledger = self._load()
            self.position = max(0, self.position - lag)
            # Written whole, the changelog may have reached the broker with its partials, or without them.
            return partials if crash >= len(changes) and crash % 2 else []
        self.store.write(dict(changes), checkpoint=end - 1)
        self.position = end
        return partials


class ShardModel(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        # Partition 0 is home to both budgets; the hot budget's shards are on 1..3 (one shares with the cold one's
        # home, as partitions are shared in a deployment).
        self.partitions = [Partition(n) for n in range(SHARDS + 1)]
        self.reference = PartitionLedger(9, MemoryStore(), CONFIG, policy_for)
        self.ref_offset = 0
        self.clock = START
        self.times: dict[str, float] = {}
        self.sources = [0, 0]
        self.sent: list[LedgerEntry] = []  # every partial sent home

    def _send(self, partition: int, e: LedgerEntry, to_reference: bool = True) -> None:
        self.partitions[partition].log.append((e, self.clock))
        if to_reference:
            unsharded = e.model_copy(update={"budget_id": e.budget_id.split("#")[0] if e.budget_id else None})
            event(f"reference: {self.reference.apply(unsharded, self.ref_offset, max_time=self.clock + 300)}")
            self.ref_offset += 1

    @rule(
        hot=st.booleans(),
        request=st.sampled_from(REQUESTS),
        kind=st.sampled_from(["reserve", "settle"]),
        amount=AMOUNTS,
        ttl=st.sampled_from([None, 60, 3600]),
        back=st.sampled_from([0, 60, 9000]),
        source=st.integers(0, 1),
    )
    def entry(self, hot: bool, request: str, kind: str, amount: int, ttl: int | None, back: int, source: int) -> None:
        budget = HOT if hot else COLD
        at = datetime.fromtimestamp(self.times.setdefault(request, self.clock - back), UTC)
        target = account(budget, request, SHARDS) if hot else budget
        partition = int(target.rsplit("#", 1)[1]) + 1 if hot else 1
        self.sources[source] += 1
        e = LedgerEntry(
            entry_id=entry_id(request, 0, kind, target),
            budget_id=target,
            request_id=request,
            kind=kind,
            period=period_of(at),
            amount_pico_usd=amount,
            occurred_at=at,
            ttl_s=ttl,  # type: ignore[arg-type]
            source_partition=source,
            source_offset=self.sources[source],
        )
        self._send(partition, e)

    @precondition(lambda self: any(p.log for p in self.partitions[1:]))
    @rule(data=st.data())
    def duplicate(self, data: Any) -> None:
        partition = data.draw(st.sampled_from([p for p in self.partitions[1:] if p.log]))
        e, _ = data.draw(st.sampled_from(partition.log))
        self._send(partition.number, e)

    @rule(advance=st.sampled_from([0, 60, 900, 4 * 3600]), expire=st.booleans())
    def tick(self, advance: int, expire: bool) -> None:
        self.clock += advance
        at = datetime.fromtimestamp(self.clock, UTC)
        for p in self.partitions:
            tick = LedgerEntry(
                entry_id=f"tick:{p.number}:{self.clock}",
                kind="tick",
                request_id="tick",
                period=period_of(at),
                amount_pico_usd=0,
                occurred_at=at,
                expire=expire,
            )
            self._send(p.number, tick, to_reference=p.number == 0)

    @rule(
        number=st.integers(0, SHARDS),
        size=st.integers(1, 6),
        crash=st.one_of(st.sampled_from([None] * 3), st.integers(0, 8), st.just(41)),
        lag=st.integers(0, 3),
    )
    def batch(self, number: int, size: int, crash: int | None, lag: int) -> None:
        partition = self.partitions[number]
        if partition.position >= len(partition.log):
            return
        for home, value in partition.batch(size, crash, lag):
            entry, _ = decode(LedgerEntry, value)
            assert home == entry.budget_id == HOT
            event("partial sent")
            self.sent.append(entry)
            self.partitions[0].log.append((entry, self.clock))

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def stale_partial(self, data: Any) -> None:
        """A partial sent before reaches home again, after later ones: a worker that lost the shard's partition
        in a rebalance and did not know it yet sends what it had."""
        self.partitions[0].log.append((data.draw(st.sampled_from(self.sent)), self.clock))

    @rule()
    def quiesce(self) -> None:
        """Apply every log to its end (shards first, their partials then reach home) and compare with the
        reference."""
        for _ in range(3):
            for p in self.partitions:
                while p.position < len(p.log):
                    for _, value in p.batch(8, None, 0):
                        self.partitions[0].log.append((decode(LedgerEntry, value)[0], self.clock))
        home = self.partitions[0].ledger
        for (budget, period), expected in self.reference.periods.items():
            if budget != HOT:
                continue
            merged = home.period_state(HOT, period)
            event(f"compared a month with {'some' if expected.spend else 'no'} spend")
            if merged is None:
                assert expected.settled == expected.reserved == 0
                assert expected.requests == 0
                continue
            assert (merged.settled, merged.reserved, merged.requests, merged.settles) == (
                expected.settled,
                expected.reserved,
                expected.requests,
                expected.settles,
            ), period
            assert merged.status == expected.status, (period, merged.spend)
            event(f"status: {merged.status}")
            for p, offset in merged.covers.items():
                assert offset <= expected.covers.get(p, -1), "a status claims to cover what was not counted"


ShardModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=40,
    derandomize=EXAMPLES <= 400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestShardModel = ShardModel.TestCase
