"""A model-based test of the partition ledger: random histories against a plain reference model.

Hypothesis drives :class:`PartitionLedger` with random sequences of reserves, settles (before or after their
reserve, with TTLs that differ from their reserve's), duplicates, adjustments of any sign and size up to the
bound, ticks from clocks that run ahead, policy changes, month boundaries, and crashes at every write point of a
batch followed by recovery from the store. After every batch the ledger's state equals :class:`Reference`, which
applies the same entries by the rules written plainly (every request kept forever, nothing incremental), and
building a status from any period never raises.

CI runs a fixed set of histories (derandomized); a long run draws new ones:
``BUDGETFLOW_MODEL_EXAMPLES=20000 .venv/bin/pytest tests/unit/test_ledger_model.py --timeout=0
--hypothesis-show-statistics`` (the statistics show how often each outcome and a comparison came up; docs/operations.md,
"Reliability and security", says what long runs found).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from budgetflow.schemas.events import LedgerEntry, StatusName, entry_id, period_of
from budgetflow.schemas.money import MAX_ENTRY_PICO
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.store import MemoryStore
from budgetflow.streams.rules.status import StatusRules, build_status

EXAMPLES = int(os.environ.get("BUDGETFLOW_MODEL_EXAMPLES", "300"))
START = datetime(2026, 11, 29, 20, tzinfo=UTC).timestamp()  # close to a month boundary
SKEW_S = 300.0
CONFIG = LedgerConfig(
    horizon_s=7200,
    grace_s=2 * 86400,
    default_ttl_s=600,
    sweep_keys_per_tick=3,
    sweep_interval_s=300,
    rules=StatusRules(),
    max_period_pico=2 * MAX_ENTRY_PICO,
)
# Amounts anywhere in range, and often at its edges: months reach the period bound within a few entries.
AMOUNTS = st.one_of(st.integers(0, MAX_ENTRY_PICO), st.sampled_from([0, 1, MAX_ENTRY_PICO - 1, MAX_ENTRY_PICO]))
SIGNED = st.one_of(AMOUNTS, AMOUNTS.map(lambda a: -a))
BUDGETS = ("global", "team:a", "team:b")
LIMITS = (None, "0", "0.000001", "0.5", "3", "1000000")
REQUESTS = tuple(f"r{i}" for i in range(6))
ROUTERS = ("gw1", "gw2")


def _policy(budget: str, limit: str | None, soft: int) -> BudgetPolicy:
    return BudgetPolicy(id=budget, monthly_limit_usd=limit, soft_limit_percent=soft)  # type: ignore[arg-type]


@dataclass
class Req:
    """What the reference keeps of one (budget, request, attempt): the first entry's time and TTL, forever."""

    period: str
    req_at: float
    ttl_s: int
    est: int | None = None
    act: int | None = None
    expired: bool = False

    @property
    def is_open(self) -> bool:
        return self.est is not None and self.act is None and not self.expired

    @property
    def settled(self) -> int:
        if self.act is not None:
            return self.act
        return self.est if self.expired and self.est is not None else 0

    @property
    def reserved(self) -> int:
        return self.est if self.is_open and self.est is not None else 0


@dataclass
class Lease:
    """A router's lease on a budget's month, as the reference keeps it."""

    epoch: int = 0
    granted: int = 0
    used: int = 0
    expires_at: float = 0.0
    asks: int = -1

    @property
    def outstanding(self) -> int:
        return max(0, self.granted - self.used)


@dataclass
class Period:
    settled: int = 0
    reserved: int = 0
    requests: int = 0
    settles: int = 0
    expired: int = 0
    adjusted: int = 0
    unpriced: int = 0
    status: StatusName = "normal"
    events: list[str] = field(default_factory=list)


class Reference:
    """The ledger's rules, plainly: one pass over the entries, sums recomputed from all requests."""

    def __init__(self, policy_for: Any) -> None:
        self.policy_for = policy_for
        self.requests: dict[tuple[str, str, int], Req] = {}
        self.periods: dict[tuple[str, str], Period] = {}
        self.covers: dict[tuple[str, str, str], dict[int, int]] = {}
        self.leases: dict[tuple[str, str, str], Lease] = {}
        self.stream_time = 0.0

    def _sums(self, budget: str, period: str) -> tuple[int, int]:
        reqs = [r for (b, _, _), r in self.requests.items() if b == budget and r.period == period]
        return sum(r.settled for r in reqs), sum(r.reserved for r in reqs)

    def _status(self, key: tuple[str, str]) -> None:
        period = self.periods[key]
        status = CONFIG.rules.next_status(period.status, period.settled + period.reserved, self.policy_for(key[0]))
        if status != period.status:
            period.status = status
            if status not in period.events:
                period.events.append(status)

    def apply(self, e: LedgerEntry, broker_time: float) -> str:
        if e.kind == "tick":
            now = min(e.occurred_at.timestamp(), broker_time + SKEW_S)
            self.stream_time = max(self.stream_time, now)
            if e.expire:
                for (budget, _, _), r in self.requests.items():
                    if r.is_open and r.req_at + r.ttl_s <= now:
                        r.expired = True
                        period = self.periods[(budget, r.period)]
                        period.expired += 1
                        period.settled, period.reserved = self._sums(budget, r.period)
                for lease in self.leases.values():
                    if lease.outstanding and lease.expires_at <= now:  # released: its epoch moves on
                        event("lease: released")
                        lease.epoch, lease.granted, lease.used = lease.epoch + 1, 0, 0
            return "tick"
        assert e.budget_id is not None
        end = datetime.fromisoformat(f"{e.period}-01T00:00:00+00:00")
        end = (end + timedelta(days=32)).replace(day=1)
        if end.timestamp() + CONFIG.grace_s < self.stream_time:
            return "late_period"
        if e.kind == "lease":
            return self._ask(e)
        key = (e.budget_id, e.request_id, e.attempt)
        req = self.requests.get(key)
        req_at = e.occurred_at.timestamp()
        if req is not None and req.req_at + req.ttl_s + CONFIG.horizon_s < self.stream_time:
            return "late_horizon"
        if req is None and req_at + CONFIG.horizon_s < self.stream_time:
            return "late_horizon"
        if e.source_partition is not None and e.source_offset is not None:
            # Counted, found a duplicate or refused: past this entry, its request (or usage) event is covered.
            covers = self.covers.setdefault((e.kind, e.budget_id, e.period), {})
            covers[e.source_partition] = max(covers.get(e.source_partition, -1), e.source_offset)
        new = req is None
        after = Req(e.period, req_at, e.ttl_s or CONFIG.default_ttl_s) if new else Req(**vars(req))  # type: ignore[arg-type]
        if e.kind == "reserve":
            if after.est is not None:
                return "duplicate"
            after.est = e.amount_pico_usd
        else:
            if after.act is not None:
                return "duplicate"
            after.act = e.amount_pico_usd
        pkey = (e.budget_id, after.period)
        old = self.periods.get(pkey)
        before_settled, before_reserved = self._sums(*pkey)
        settled = before_settled - (req.settled if req else 0) + after.settled
        reserved = before_reserved - (req.reserved if req else 0) + after.reserved
        if abs(settled) + reserved > CONFIG.max_period_pico:
            return "out_of_range"
        self.requests[key] = after
        period = old or self.periods.setdefault(pkey, Period())
        period.settled, period.reserved = self._sums(*pkey)
        if new:
            period.requests += 1
            period.unpriced += not e.priced
        if e.kind in ("settle", "adjust") and (req is None or req.act is None):
            period.settles += 1
        if req is not None and req.expired and e.kind == "settle":
            period.adjusted += 1
        if e.kind == "reserve" and (req is None or req.est is None) and e.lease_router and e.lease_pico is not None:
            lease = self.leases.get((e.budget_id, e.period, e.lease_router))
            if lease is not None and lease.epoch == e.lease_epoch:  # the router's charge moves off its lease
                event(f"lease: a reserve used {'some' if min(e.lease_pico, lease.outstanding) else 'none'}")
                lease.used += min(e.lease_pico, lease.outstanding)
        self._status(pkey)
        return "applied"

    def leased(self, budget: str, period: str) -> int:
        return sum(lease.outstanding for (b, p, _), lease in self.leases.items() if (b, p) == (budget, period))

    def _ask(self, e: LedgerEntry) -> str:
        """A router's ask: at most the available headroom, and at most its equal share of what is not spent."""
        assert e.budget_id is not None
        lease = self.leases.setdefault((e.budget_id, e.period, e.request_id), Lease())
        if e.attempt <= lease.asks:
            return "duplicate"
        period = self.periods.setdefault((e.budget_id, e.period), Period())
        limit = self.policy_for(e.budget_id).monthly_limit_usd
        grant = e.amount_pico_usd
        if limit is not None:
            unspent = limit - period.settled - period.reserved
            holders = {r for (b, p, r), h in self.leases.items() if (b, p) == (e.budget_id, e.period) and h.outstanding}
            share = unspent // len(holders | {e.request_id}) - lease.outstanding
            grant = max(0, min(grant, unspent - self.leased(e.budget_id, e.period), share))
        event(f"lease: {'granted' if grant else 'nothing granted'}{' (capped)' if grant < e.amount_pico_usd else ''}")
        lease.granted += grant
        lease.expires_at = max(lease.expires_at, e.occurred_at.timestamp() + (e.ttl_s or 0))
        lease.asks = e.attempt
        self._status((e.budget_id, e.period))
        if limit is not None and grant:
            # The guarantee: a grant never takes the month's settled + reserved + leased past its limit.
            assert period.settled + period.reserved + self.leased(e.budget_id, e.period) <= limit
        return "applied"

    def refresh(self, budget: str) -> None:
        for key in [k for k in self.periods if k[0] == budget]:
            self._status(key)


class LedgerModel(RuleBasedStateMachine):
    """The log, the ledger under test (with crashes), and the reference, applied batch by batch."""

    @initialize()
    def setup(self) -> None:
        self.policies: dict[str, BudgetPolicy] = {
            "team:a": _policy("team:a", "3", 50),
            "team:b": _policy("team:b", "0.5", 80),
        }
        self.clock = START
        self.times: dict[tuple[str, int], float] = {}
        self.log: list[tuple[LedgerEntry, float]] = []  # (entry, the broker's time when it was appended)
        self.store = MemoryStore()
        self.ledger = self._load()
        self.position = 0  # where the ledger resumes: its committed offset
        self.reference = Reference(self.policy_for)
        self.ref_position = 0
        self.high = -1  # the highest offset any run of the ledger applied
        self.adjustments = 0
        # The next offset of each partition of the requests and of the usage topic (enrich reads each in order).
        self.sources = {"reserve": [0, 0], "settle": [0, 0]}
        self.asks = 0
        self.asked: dict[str, list[str]] = {}  # the routers that asked for a lease on each budget, in order
        self.spends = 0

    def policy_for(self, budget: str) -> BudgetPolicy:
        return self.policies.get(budget) or BudgetPolicy(id=budget)

    def _load(self) -> PartitionLedger:
        ledger = PartitionLedger(0, self.store, CONFIG, self.policy_for)
        ledger.refresh_all()  # as the aggregate does after a recovery
        return ledger

    def _append(self, e: LedgerEntry) -> None:
        self.log.append((e, self.clock))

    def _request_time(self, request: str, attempt: int, back_s: int) -> float:
        return self.times.setdefault((request, attempt), self.clock - back_s)

    # -- what gateways and operators do ----------------------------------------------------------------------
    @rule(
        budget=st.sampled_from(BUDGETS),
        request=st.sampled_from(REQUESTS),
        attempt=st.integers(0, 1),
        kind=st.sampled_from(["reserve", "settle"]),
        amount=AMOUNTS,
        ttl=st.sampled_from([None, 60, 600, 3600]),
        back=st.sampled_from([0, 60, 3000, 9000]),
        priced=st.booleans(),
        source=st.integers(0, 1),
        # A reserve admitted under a lease: mostly of a router that asked on the budget, in its first epoch.
        lease=st.one_of(st.none(), st.tuples(st.integers(0, 2), st.sampled_from([0, 0, 0, 1, 2]), AMOUNTS)),
    )
    def entry(
        self,
        budget: str,
        request: str,
        attempt: int,
        kind: str,
        amount: int,
        ttl: int | None,
        back: int,
        priced: bool,
        source: int,
        lease: tuple[int, int, int] | None,
    ) -> None:
        at = datetime.fromtimestamp(self._request_time(request, attempt, back), UTC)
        # The request (or usage) event's place on its topic.
        position: dict[str, Any] = {"source_partition": source, "source_offset": self.sources[kind][source]}
        self.sources[kind][source] += 1
        if lease is not None and kind == "reserve":  # admitted under a router's lease
            routers = self.asked.get(budget) or list(ROUTERS)
            router = routers[lease[0] % len(routers)]
            position.update(lease_router=router, lease_epoch=lease[1], lease_pico=lease[2])
        self._append(
            LedgerEntry(
                entry_id=entry_id(request, attempt, kind, budget),
                budget_id=budget,
                request_id=request,
                attempt=attempt,
                kind=kind,
                period=period_of(at),
                amount_pico_usd=amount,
                occurred_at=at,
                ttl_s=ttl,  # type: ignore[arg-type]
                priced=priced,
                **position,  # type: ignore[arg-type]
            )
        )

    @precondition(lambda self: bool(self.asked))
    @rule(data=st.data(), amount=AMOUNTS, source=st.integers(0, 1), stale=st.booleans())
    def spend(self, data: Any, amount: int, source: int, stale: bool) -> None:
        """A router admits a new request under its lease on a budget it asked on: the request's reserve carries
        the lease's epoch as the router last saw it (``stale``: the epoch before, as after a release it missed)."""
        budget = data.draw(st.sampled_from(sorted(self.asked)))
        router = data.draw(st.sampled_from(self.asked[budget]))
        at = datetime.fromtimestamp(self.clock, UTC)
        known = self.reference.leases.get((budget, period_of(at), router))
        epoch = max(0, (known.epoch if known is not None else 0) - stale)
        self.spends += 1
        self._append(
            LedgerEntry(
                entry_id=entry_id(f"s{self.spends}", 0, "reserve", budget),
                budget_id=budget,
                request_id=f"s{self.spends}",
                attempt=0,
                kind="reserve",
                period=period_of(at),
                amount_pico_usd=amount,
                occurred_at=at,
                ttl_s=600,
                source_partition=source,
                source_offset=self.sources["reserve"][source],
                lease_router=router,
                lease_epoch=epoch,
                lease_pico=amount,
            )
        )
        self.sources["reserve"][source] += 1

    @rule(
        budget=st.sampled_from(BUDGETS), router=st.sampled_from(ROUTERS), amount=AMOUNTS, ttl=st.sampled_from([60, 900])
    )
    def ask(self, budget: str, router: str, amount: int, ttl: int) -> None:
        """A router asks for headroom on a budget (its asks numbered in order)."""
        self.asks += 1
        if router not in self.asked.setdefault(budget, []):
            self.asked[budget].append(router)
        at = datetime.fromtimestamp(self.clock, UTC)
        self._append(
            LedgerEntry(
                entry_id=entry_id(router, self.asks, "lease", budget),
                budget_id=budget,
                request_id=router,
                attempt=self.asks,
                kind="lease",
                period=period_of(at),
                amount_pico_usd=amount,
                occurred_at=at,
                ttl_s=ttl,
            )
        )

    @rule(budget=st.sampled_from(BUDGETS), amount=SIGNED)
    def adjust(self, budget: str, amount: int) -> None:
        self.adjustments += 1
        at = datetime.fromtimestamp(self.clock, UTC)
        request = f"adjust:{self.adjustments}"
        self._append(
            LedgerEntry(
                entry_id=entry_id(request, 0, "adjust", budget),
                budget_id=budget,
                request_id=request,
                kind="adjust",
                period=period_of(at),
                amount_pico_usd=amount,
                occurred_at=at,
            )
        )

    @precondition(lambda self: bool(self.log))
    @rule(data=st.data())
    def duplicate(self, data: Any) -> None:
        e, _ = data.draw(st.sampled_from(self.log))
        self._append(e)

    @rule(
        advance=st.sampled_from([0, 30, 600, 3600, 4 * 3600, 2 * 86400]),
        ahead=st.sampled_from([0, 0, 0, 120, 40 * 86400]),
        expire=st.booleans(),
    )
    def tick(self, advance: int, ahead: int, expire: bool) -> None:
        """Time moves; a tick may come from a clock far ahead of the broker's (bounded by broker time + skew)."""
        self.clock += advance
        at = datetime.fromtimestamp(self.clock + ahead, UTC)
        self._append(
            LedgerEntry(
                entry_id=f"tick:0:{self.clock + ahead}",
                kind="tick",
                request_id="tick",
                period=period_of(at),
                amount_pico_usd=0,
                occurred_at=at,
                expire=expire,
            )
        )

    # Policies are not in the log: a status depends on when a worker read them. So they change where the ledger
    # and the reference have applied the same entries (statuses under hysteresis depend on the path).
    @precondition(lambda self: self.position == self.ref_position and self.position - 1 >= self.high)
    @rule(budget=st.sampled_from(BUDGETS), limit=st.sampled_from(LIMITS), soft=st.sampled_from([1, 50, 99]))
    def change_policy(self, budget: str, limit: str | None, soft: int) -> None:
        self.policies[budget] = _policy(budget, limit, soft)
        self.ledger.refresh_policy(budget)
        # Written at once (the worker's next cycle): a crash that loses a re-evaluation is followed by
        # refresh_all, which reaches the same status but not the intermediate events the reference records.
        self.store.write(dict(self.ledger.drain()), checkpoint=self.position - 1)
        self.reference.refresh(budget)

    # -- what the worker does ----------------------------------------------------------------------------------
    @precondition(lambda self: self.position < len(self.log))
    @rule(
        size=st.integers(1, 8),
        crash=st.one_of(
            st.sampled_from([None] * 3), st.integers(0, 8), st.just(40)
        ),  # a crash after any of the first writes
        lag=st.integers(0, 3),
    )
    def batch(self, size: int, crash: int | None, lag: int) -> None:
        """Apply a batch; write its changes in the ledger's order. A crash makes only a prefix durable, and the
        restart may resume from a committed offset that lags the state (the commit can be lost too)."""
        end = min(self.position + size, len(self.log))
        for offset in range(self.position, end):
            e, broker_time = self.log[offset]
            event(f"outcome: {self.ledger.apply(e, offset, max_time=broker_time + SKEW_S)}")
        self.high = max(self.high, end - 1)
        changes = self.ledger.drain()
        if crash is not None:
            self.store.write(dict(changes[: min(crash, len(changes))]), checkpoint=end - 1)
            self.ledger = self._load()
            self.position = max(0, self.position - lag)
            return
        self.store.write(dict(changes), checkpoint=end - 1)
        self.position = end
        while self.ref_position < end:
            e, broker_time = self.log[self.ref_position]
            self.reference.apply(e, broker_time)
            self.ref_position += 1
        if end - 1 >= self.high:
            # Caught up with everything any crashed run applied (part of which may be durable): same entries.
            event("compared")
            self._compare()

    def _compare(self) -> None:
        assert self.ledger.anomalies == 0
        assert self.ledger.meta.stream_time == self.reference.stream_time
        got = {
            k: (p.settled, p.reserved, p.requests, p.settles, p.expired, p.adjusted, p.unpriced, p.status, p.events)
            for k, p in self.ledger.periods.items()
        }
        want = {
            k: (p.settled, p.reserved, p.requests, p.settles, p.expired, p.adjusted, p.unpriced, p.status, p.events)
            for k, p in self.reference.periods.items()
        }
        assert got == want
        covers = {("reserve", *k): p.covers for k, p in self.ledger.periods.items() if p.covers}
        covers |= {("settle", *k): p.covers_usage for k, p in self.ledger.periods.items() if p.covers_usage}
        assert covers == {k: c for k, c in self.reference.covers.items() if c}
        leases = {k: (s.epoch, s.granted, s.used, s.expires_at, s.asks) for k, s in self.ledger.leases.leases.items()}
        want_leases = {
            k: (s.epoch, s.granted, s.used, s.expires_at, s.asks)
            for k, s in self.reference.leases.items()
            if s.asks >= 0 and (k[0], k[1]) in self.reference.periods
        }
        assert leases == want_leases
        held = {k: p.leased for k, p in self.ledger.periods.items() if p.leased}
        assert held == {k: self.reference.leased(*k) for k in self.reference.periods if self.reference.leased(*k)}
        opened = {k: r.est for k, r in self.reference.requests.items() if r.is_open}
        assert {k: r.est for k, r in self.ledger._open.items()} == opened

    @invariant()
    def statuses_always_build(self) -> None:
        """Whatever state the ledger reached, a status can be built from it (and encoded)."""
        if not hasattr(self, "ledger"):
            return
        for (budget, period), state in self.ledger.periods.items():
            build_status(
                budget_id=budget,
                period=period,
                status=state.status,
                previous_status=None,
                settled=state.settled,
                reserved=state.reserved,
                policy=self.policy_for(budget),
                as_of=datetime.fromtimestamp(self.clock, UTC),
                reason="refresh",
                partition=0,
                seq=max(self.ledger.meta.applied, -1),
            ).model_dump_json()


LedgerModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize="BUDGETFLOW_MODEL_EXAMPLES" not in os.environ,  # CI: the same histories every run; long runs: new ones
)
test_ledger_matches_the_reference_model = LedgerModel.TestCase
