"""The partition ledger: exact sums, idempotence, and replay after a crash at any write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetflow.schemas.events import LedgerEntry, entry_id
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.records import PartitionMeta, PeriodState, RequestState
from budgetflow.streams.aggregate.store import MemoryStore

T0 = datetime(2026, 11, 10, 12, tzinfo=UTC)
POLICIES = {
    "team:a": BudgetPolicy(id="team:a", monthly_limit_usd="0.001", soft_limit_percent=50),  # type: ignore[arg-type]
    "global": BudgetPolicy(id="global"),
}


def policy_for(budget: str) -> BudgetPolicy:
    return POLICIES.get(budget, BudgetPolicy(id=budget))


def entry(
    kind: str, budget: str, request: str, amount: int, *, at: datetime = T0, attempt: int = 0, **kw: Any
) -> LedgerEntry:
    return LedgerEntry(
        entry_id=entry_id(request, attempt, kind, budget),
        budget_id=None if kind == "tick" else budget,
        request_id=request,
        attempt=attempt,
        kind=kind,  # type: ignore[arg-type]
        period=f"{at.year:04d}-{at.month:02d}",
        amount_pico_usd=amount,
        occurred_at=at,
        **kw,
    )


def tick(at: datetime, *, expire: bool = True) -> LedgerEntry:
    return entry("tick", "", "tick", 0, at=at, expire=expire)


def new_ledger(store: MemoryStore | None = None, **config: Any) -> PartitionLedger:
    return PartitionLedger(0, store or MemoryStore(), LedgerConfig(**config), policy_for)


def run(ledger: PartitionLedger, entries: list[LedgerEntry], start: int = 0, batch: int = 3) -> list[str]:
    outcomes = []
    for first in range(0, len(entries), batch):
        for offset, e in enumerate(entries[first : first + batch], start=start + first):
            outcomes.append(ledger.apply(e, offset))
        changes = ledger.drain()
        ledger.store.write(dict(changes), checkpoint=start + first)
    return outcomes


def sums(ledger: PartitionLedger) -> dict[tuple[str, str], tuple[int, int]]:
    return {k: (p.settled, p.reserved) for k, p in ledger.periods.items()}


def test_reserve_then_settle_replaces_the_estimate() -> None:
    ledger = new_ledger()
    run(ledger, [entry("reserve", "global", "r1", 100), entry("settle", "global", "r1", 70)])
    period = ledger.period_state("global", "2026-11")
    assert period is not None
    assert (period.settled, period.reserved, period.requests, period.settles) == (70, 0, 1, 1)


def test_settle_before_reserve_absorbs_the_reserve() -> None:
    ledger = new_ledger()
    outcomes = run(ledger, [entry("settle", "global", "r1", 70), entry("reserve", "global", "r1", 100)])
    assert outcomes == ["applied", "applied"]
    assert sums(ledger) == {("global", "2026-11"): (70, 0)}
    assert ledger.open_reservations == 0


def test_duplicates_change_nothing() -> None:
    ledger = new_ledger()
    e1, e2 = entry("reserve", "global", "r1", 100), entry("settle", "global", "r1", 70)
    outcomes = run(ledger, [e1, e2, e1, e2, entry("settle", "global", "r1", 999)])
    assert outcomes[2:] == ["duplicate", "duplicate", "duplicate"]
    assert sums(ledger) == {("global", "2026-11"): (70, 0)}


def test_retries_are_new_attempts() -> None:
    ledger = new_ledger()
    run(ledger, [entry("settle", "global", "r1", 5), entry("settle", "global", "r1", 7, attempt=1)])
    assert sums(ledger) == {("global", "2026-11"): (12, 0)}


def test_an_expired_reservation_counts_its_estimate_until_usage_replaces_it() -> None:
    ledger = new_ledger(default_ttl_s=600)
    run(ledger, [entry("reserve", "global", "r1", 100), tick(T0 + timedelta(minutes=5))])
    assert sums(ledger) == {("global", "2026-11"): (0, 100)}
    run(ledger, [tick(T0 + timedelta(minutes=11))], start=10)
    assert sums(ledger) == {("global", "2026-11"): (100, 0)}
    assert ledger.open_reservations == 0
    run(ledger, [entry("settle", "global", "r1", 60)], start=20)
    period = ledger.period_state("global", "2026-11")
    assert period is not None
    assert (period.settled, period.reserved, period.expired, period.adjusted) == (60, 0, 1, 1)


def test_one_tick_expires_several_reservations_of_one_budget() -> None:
    ledger = new_ledger(default_ttl_s=600)
    run(
        ledger,
        [entry("reserve", "global", f"r{i}", 100 + i) for i in range(3)] + [tick(T0 + timedelta(hours=1))],
        batch=10,
    )
    assert sums(ledger) == {("global", "2026-11"): (303, 0)}


def test_a_tick_without_expire_does_not_expire() -> None:
    ledger = new_ledger(default_ttl_s=600)
    run(ledger, [entry("reserve", "global", "r1", 100), tick(T0 + timedelta(hours=2), expire=False)])
    assert sums(ledger) == {("global", "2026-11"): (0, 100)}


def test_entries_past_the_horizon_and_closed_periods_are_late() -> None:
    ledger = new_ledger(default_ttl_s=3600, horizon_s=86_400, grace_s=86_400)
    now = datetime(2026, 12, 3, tzinfo=UTC)
    outcomes = run(
        ledger,
        [
            tick(now),
            entry("settle", "global", "old", 1, at=datetime(2026, 11, 30, 12, tzinfo=UTC)),  # closed period
            entry("settle", "global", "r2", 1, at=now - timedelta(hours=26)),  # past TTL + horizon
            entry("settle", "global", "r3", 1, at=now - timedelta(hours=24)),
        ],
        batch=10,
    )
    assert outcomes == ["tick", "late_period", "late_horizon", "applied"]


def test_statuses_follow_thresholds_and_announce_each_transition_once() -> None:
    ledger = new_ledger()
    limit = 10**9  # team:a's limit: $0.001
    steps = [("r1", limit * 40 // 100), ("r2", limit * 15 // 100), ("r3", limit * 50 // 100)]
    run(ledger, [entry("settle", "team:a", r, a) for r, a in steps], batch=1)
    changes, touched, _ = ledger.take_outputs()
    assert [change.event for change in changes] == ["soft_limit", "hard_limit"]
    assert touched == {("team:a", "2026-11")}
    period = ledger.period_state("team:a", "2026-11")
    assert period is not None
    assert period.status == "hard_limit"


def test_rollover_is_signalled_by_a_tick_in_a_new_month() -> None:
    ledger = new_ledger()
    run(ledger, [tick(datetime(2026, 11, 30, 23, 59, tzinfo=UTC)), tick(datetime(2026, 12, 1, tzinfo=UTC))], batch=1)
    assert ledger.take_outputs()[2] == "2026-12"


def test_sweep_forgets_old_requests() -> None:
    ledger = new_ledger(default_ttl_s=3600, horizon_s=3600, grace_s=40 * 86_400)
    run(ledger, [entry("settle", "global", "r1", 5)])
    assert ledger.store.get(b"r|global\x1fr1\x1f0") is not None
    run(ledger, [tick(T0 + timedelta(hours=3))], start=10)
    assert ledger.store.get(b"r|global\x1fr1\x1f0") is None
    assert sums(ledger) == {("global", "2026-11"): (5, 0)}


# -- crash anywhere, replay, same state --------------------------------------------------------------------------

requests = st.sampled_from([f"r{i}" for i in range(8)])
budgets = st.sampled_from(["global", "team:a", "team:b"])
ops = st.one_of(
    st.tuples(st.just("reserve"), budgets, requests, st.integers(0, 3), st.integers(1, 10**6)),
    st.tuples(st.just("settle"), budgets, requests, st.integers(0, 3), st.integers(0, 10**6)),
    st.tuples(st.just("adjust"), budgets, requests, st.just(0), st.integers(-(10**5), 10**5)),
    st.tuples(st.just("tick"), st.just(""), st.just(""), st.just(0), st.integers(0, 30)),
)


def to_entries(raw_ops: list[tuple[str, str, str, int, int]]) -> list[LedgerEntry]:
    out = []
    minute = 0
    for kind, budget, request, attempt, amount in raw_ops:
        if kind == "tick":
            minute += amount
            out.append(tick(T0 + timedelta(minutes=minute), expire=amount % 3 != 0))
        elif kind == "adjust":
            out.append(entry("adjust", budget, f"adj-{request}", amount, at=T0))
        else:
            out.append(entry(kind, budget, request, amount, attempt=attempt, at=T0, ttl_s=600))
    return out


def clean_run(entries: list[LedgerEntry], batch: int) -> PartitionLedger:
    ledger = new_ledger()
    run(ledger, entries, batch=batch)
    return ledger


def state_of(ledger: PartitionLedger) -> dict[Any, Any]:
    periods = {
        k: (p.settled, p.reserved, p.requests, p.settles, p.expired, p.status, tuple(p.events))
        for k, p in ledger.periods.items()
    }
    return {"periods": periods, "open": sorted(ledger._open)}


@settings(max_examples=300, deadline=None)
@given(
    raw_ops=st.lists(ops, min_size=1, max_size=40),
    batch=st.integers(1, 6),
    crash_batch=st.integers(0, 10),
    prefix=st.integers(0, 60),
    commit_lag=st.integers(0, 2),
    data=st.data(),
)
def test_replay_after_a_crash_at_any_write_gives_the_same_state(
    raw_ops: list[tuple[str, str, str, int, int]], batch: int, crash_batch: int, prefix: int, commit_lag: int, data: Any
) -> None:
    entries = to_entries(raw_ops)
    reference = clean_run(entries, batch)

    store = MemoryStore()
    ledger = new_ledger(store)
    starts = list(range(0, len(entries), batch))
    crash_at = starts[min(crash_batch, len(starts) - 1)]
    committed = 0
    for first in starts:
        for offset in range(first, min(first + batch, len(entries))):
            ledger.apply(entries[offset], offset)
        changes = ledger.drain()
        if first == crash_at:
            # Only a prefix of this batch's changelog writes became durable; then kill -9.
            store.write(dict(changes[: min(prefix, len(changes))]), checkpoint=first)
            break
        store.write(dict(changes), checkpoint=first)
        committed = first + batch  # offsets are committed only after the flush
    # The committed offset may lag the durable state (the commit itself can be lost too).
    restart = max(0, committed - commit_lag * batch)
    recovered = new_ledger(store)
    run(recovered, entries[restart:], start=restart, batch=data.draw(st.integers(1, 6)))
    assert recovered.anomalies == 0
    assert state_of(recovered) == state_of(reference)


@pytest.mark.parametrize("prefix", range(6))
def test_a_reserve_that_used_a_lease_replays_to_the_same_lease_whatever_prefix_of_its_batch_survived(
    prefix: int,
) -> None:
    """A lease granted in one batch, a reserve admitted under it in the next; a crash keeps only the first
    ``prefix`` writes of that batch. Replayed, the lease and the period say what a run without the crash says.
    With the lease record written after the request's, a prefix that kept the request but not the lease had the
    reserve skipped as replayed and its lease still holding what it used: the period's leased and the lease's
    disagreed, and the lease's expiry later took leased below zero (found by kill -9 on the real pipeline)."""
    ask = entry("lease", "team:a", "gw1", 6 * 10**8, attempt=1, ttl_s=600)
    tag = {"lease_router": "gw1", "lease_epoch": 0, "lease_pico": 2 * 10**8}
    entries = [ask, entry("reserve", "team:a", "r1", 2 * 10**8, ttl_s=600, **tag)]
    reference = new_ledger()
    run(reference, entries, batch=1)

    store = MemoryStore()
    ledger = new_ledger(store)
    run(ledger, entries[:1], batch=1)
    ledger.apply(entries[1], 1)
    changes = ledger.drain()
    assert len(changes) >= 4  # the period, the lease, the request and the meta record
    store.write(dict(changes[:prefix]), checkpoint=1)
    recovered = new_ledger(store)
    run(recovered, entries[1:], start=1, batch=1)

    def leases(ledger: PartitionLedger) -> Any:
        period = ledger.periods[("team:a", "2026-11")]
        held = {k: (s.granted, s.used) for k, s in ledger.leases.leases.items()}
        return period.leased, period.reserved, held

    assert leases(recovered) == leases(reference)
    assert leases(reference) == (4 * 10**8, 2 * 10**8, {("team:a", "2026-11", "gw1"): (6 * 10**8, 2 * 10**8)})


@settings(max_examples=300, deadline=None)
@given(raw_ops=st.lists(ops, min_size=1, max_size=40), batch=st.integers(1, 6))
def test_sums_equal_an_independent_count(raw_ops: list[tuple[str, str, str, int, int]], batch: int) -> None:
    entries = to_entries(raw_ops)
    # A last tick a day later expires whatever is still open.
    entries.append(tick(T0 + timedelta(days=1)))
    ledger = clean_run(entries, batch)
    # settled = the first settle (or adjust) per request, else its first estimate (expired).
    est: dict[tuple[str, str, int], int] = {}
    act: dict[tuple[str, str, int], int] = {}
    for e in entries:
        key = (e.budget_id or "", e.request_id, e.attempt)
        if e.kind == "tick":
            continue
        if e.kind == "reserve":
            est.setdefault(key, e.amount_pico_usd)
        else:
            act.setdefault(key, e.amount_pico_usd)
    expected: dict[tuple[str, str], list[int]] = {}
    for key in est.keys() | act.keys():
        totals = expected.setdefault((key[0], "2026-11"), [0, 0])
        totals[0] += act[key] if key in act else est[key]
    assert sums(ledger) == {k: tuple(v) for k, v in expected.items()}


@pytest.mark.parametrize("budget", ["team:a", "global"])
def test_policy_refresh_reevaluates_status(budget: str) -> None:
    ledger = new_ledger()
    run(ledger, [entry("settle", budget, "r1", 10**9)])
    POLICIES["tmp"] = BudgetPolicy(id="tmp")
    before = ledger.period_state(budget, "2026-11")
    assert before is not None
    ledger.refresh_policy(budget)
    assert ledger.drain()[0][0].startswith(b"p|" + budget.encode())


# -- the persisted records -----------------------------------------------------------------------------------------
# Records are JSON arrays: a field's name is never written. These bytes are what the code wrote before the offset
# field ``o`` became ``ledger_offset`` (and, the last one, before period records kept their refusals).
OLD_PERIOD = b'[7,3,2,1,0,0,1,"soft_limit",["soft_limit"],41,[40]]'
OLD_PERIOD_BEFORE_REFUSALS = b'[7,3,2,1,0,0,1,"soft_limit",["soft_limit"],41]'
OLD_WIDE_PERIOD = b'["30000000000000000000","18446744073709551621",0,0,0,0,0,"normal",[],9,[]]'
OLD_REQUEST = b'["2026-11",1790000000.5,60,5,7,false,false,41]'
OLD_META = b'[41,1790000000.0,"2026-11"]'


def test_records_written_by_the_previous_code_decode_and_encode_to_the_same_bytes() -> None:
    period = PeriodState.decode("team:x", "2026-11", OLD_PERIOD)
    assert period == PeriodState("team:x", "2026-11", 7, 3, 2, 1, 0, 0, 1, "soft_limit", ["soft_limit"], 41, [40])
    assert period.ledger_offset == 41
    assert period.encode() == OLD_PERIOD
    older = PeriodState.decode("team:x", "2026-11", OLD_PERIOD_BEFORE_REFUSALS)
    assert (older.ledger_offset, older.refused) == (41, [])
    wide = PeriodState.decode("global", "2026-11", OLD_WIDE_PERIOD)
    assert (wide.settled, wide.reserved, wide.ledger_offset) == (30 * 10**18, 2**64 + 5, 9)
    assert wide.encode() == OLD_WIDE_PERIOD
    request = RequestState.decode(("team:x", "r1", 0), OLD_REQUEST)
    assert request == RequestState("team:x", "r1", 0, "2026-11", 1790000000.5, 60, 5, 7, False, False, 41)
    assert request.encode() == OLD_REQUEST
    meta = PartitionMeta.decode(OLD_META)
    assert (meta.applied, meta.stream_time, meta.period) == (41, 1790000000.0, "2026-11")
    assert meta.encode() == OLD_META


def test_a_store_written_by_the_previous_code_loads_and_skips_what_it_reflects() -> None:
    # A reservation of 5 at offset 41, durable in its request and period records, but not yet in the meta record.
    store = MemoryStore()
    store.write(
        {
            b"m|": b'[40,1790000000.0,"2026-11"]',
            b"p|team:x\x1f2026-11": b'[0,5,1,0,0,0,0,"normal",[],41,[]]',
            b"o|team:x\x1fr2\x1f0": b'["2026-11",1790000000.5,60,5,null,false,false,41]',
        },
        checkpoint=3,
    )
    ledger = new_ledger(store)
    assert ledger.open_reservations == 1
    assert ledger.apply(entry("reserve", "team:x", "r2", 5), 41) == "replayed"
    assert ledger.apply(entry("settle", "team:x", "r2", 4), 42) == "applied"
    assert ledger.anomalies == 0
    period = ledger.period_state("team:x", "2026-11")
    assert period is not None
    assert (period.settled, period.reserved, period.requests, period.ledger_offset) == (4, 0, 1, 42)


def test_a_period_keeps_the_highest_request_event_position_its_reserves_reached() -> None:
    ledger = PartitionLedger(0, MemoryStore(), LedgerConfig(), lambda b: BudgetPolicy(id=b))
    at = datetime(2026, 11, 20, tzinfo=UTC)

    def reserve(request: str, partition: int, offset: int, kind: str = "reserve") -> LedgerEntry:
        return LedgerEntry(
            entry_id=entry_id(request, 0, kind, "team:a"),
            budget_id="team:a",
            request_id=request,
            kind=kind,  # type: ignore[arg-type]
            period="2026-11",
            amount_pico_usd=5,
            occurred_at=at,
            source_partition=partition,
            source_offset=offset,
        )

    assert ledger.apply(reserve("r1", 0, 10), 0) == "applied"
    assert ledger.apply(reserve("r2", 1, 3), 1) == "applied"
    assert ledger.apply(reserve("r1", 0, 12), 2) == "duplicate"  # a replayed request event is counted already
    assert ledger.apply(reserve("r0", 0, 11), 3) == "applied"  # never lowers what is covered
    assert ledger.apply(reserve("r9", 0, 4, "settle"), 4) == "applied"  # a usage event: the other topic's
    period = ledger.periods[("team:a", "2026-11")]
    assert (period.covers, period.covers_usage) == ({0: 12, 1: 3}, {0: 4})
    assert PeriodState.decode("team:a", "2026-11", period.encode()) == period
