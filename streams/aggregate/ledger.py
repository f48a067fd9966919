"""The exact ledger of one partition: spend per (budget, period) and state per request.

Pure state, no Kafka: the aggregate worker feeds it ledger entries with their offsets, writes what
:meth:`PartitionLedger.drain` returns to the partition's changelog (in that order, through one idempotent
producer), then to the local store, then commits the offsets.

Exactly once comes from idempotent state (docs/architecture.md, "Exactly once, and how it is proven"):

* every record remembers the last ledger offset it reflects (``ledger_offset``) and skips an entry it already
  reflects; entry ids are deterministic, so a redelivered entry finds its request's state and changes nothing;
* a period record's change is the difference between its request's contribution after and before the entry, so
  it needs the request's state *before* the entry;
* a batch's changes are written in a fixed order that makes every prefix left by a crash replay to the same
  state (:mod:`budgetflow.streams.aggregate.changes`); the records are in
  :mod:`budgetflow.streams.aggregate.records`.
"""

from __future__ import annotations

import functools
import heapq
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Literal

from budgetflow.schemas.events import SHARD_MARK, LedgerEntry
from budgetflow.schemas.periods import next_month_start, period_of, shift_period
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.streams.aggregate.changes import BatchChanges, Changes
from budgetflow.streams.aggregate.leases import PartitionLeases
from budgetflow.streams.aggregate.ledgerconfig import LedgerConfig, StatusChange
from budgetflow.streams.aggregate.records import (
    META_KEY,
    OPEN_PREFIX,
    PERIOD_PREFIX,
    REQUEST_PREFIX,
    PartitionMeta,
    PeriodState,
    RequestKey,
    RequestState,
    decode_key,
    request_key,
)
from budgetflow.streams.aggregate.shardsums import merge, partial_entries
from budgetflow.streams.aggregate.store import Store

__all__ = ["ApplyResult", "LedgerConfig", "PartitionLedger", "StatusChange"]

log = logging.getLogger(__name__)

# What applying one entry did: counted it (``applied``), found it changed nothing (``duplicate``: its request's
# state has it already), skipped it as already reflected (``replayed``), refused it (``late_period``,
# ``late_horizon``, ``out_of_range``: dead-lettered), or moved time (``tick``).
ApplyResult = Literal["applied", "duplicate", "replayed", "late_period", "late_horizon", "out_of_range", "tick"]


@functools.lru_cache(maxsize=256)
def _period_end(period: str) -> float:
    return next_month_start(period).timestamp()


class PartitionLedger:
    """State of one ledger partition, fed entries in offset order."""

    def __init__(
        self,
        partition: int,
        store: Store,
        config: LedgerConfig,
        policy_for: Callable[[str], BudgetPolicy],
    ) -> None:
        self.partition = partition
        self.store = store
        self.config = config
        self.policy_for = policy_for
        self.meta = PartitionMeta()
        self.periods: dict[tuple[str, str], PeriodState] = {}
        self._open: dict[RequestKey, RequestState] = {}
        self._expiry: list[tuple[float, RequestKey]] = []
        self._changes = BatchChanges()  # of the current batch, not yet drained
        self._last_offset = -1
        self._sweep_cursor: bytes | None = None
        self._swept_at = 0.0
        # What the worker publishes after a batch.
        self.status_changes: list[StatusChange] = []
        self.touched: set[tuple[str, str]] = set()
        self._shards_touched: set[tuple[str, str]] = set()
        self.rollover_to: str | None = None
        self.anomalies = 0
        self.expirations = 0
        # Called with (before, after) at every change of a request's state, after its period took the
        # difference: what a replay needs to say which request made which spend (budgetflow report).
        self.observer: Callable[[RequestState | None, RequestState], None] | None = None
        self.leases = PartitionLeases(store, self._changes, policy_for)
        self.load()

    # -- loading ----------------------------------------------------------------
    def load(self) -> None:
        """Rebuild the in-memory indexes (periods, open reservations, meta) from the store."""
        raw = self.store.get(META_KEY)
        self.meta = PartitionMeta.decode(raw) if raw is not None else PartitionMeta()
        self.periods = {}
        for key, value in self.store.scan(PERIOD_PREFIX):
            _, (budget, period) = decode_key(key)
            self.periods[(budget, period)] = PeriodState.decode(budget, period, value)
        self._open = {}
        for key, value in self.store.scan(OPEN_PREFIX):
            _, (budget, request_id, attempt) = decode_key(key)
            rkey = (budget, request_id, int(attempt))
            state = RequestState.decode(rkey, value)
            closed_raw = self.store.get(request_key(REQUEST_PREFIX, rkey))
            if closed_raw is not None and RequestState.decode(rkey, closed_raw).ledger_offset >= state.ledger_offset:
                # A crash between writing the closed record and deleting the open one.
                self._changes.delete(key)
                continue
            self._open[rkey] = state
        self._expiry = [(s.req_at + s.ttl_s, k) for k, s in self._open.items()]
        heapq.heapify(self._expiry)
        self.leases.load()
        self._last_offset = self.meta.applied

    # -- lookups ----------------------------------------------------------------
    def _request(self, key: RequestKey) -> RequestState | None:
        state = self._changes.requests.get(key) or self._open.get(key)
        if state is not None:
            return state
        raw = self.store.get(request_key(REQUEST_PREFIX, key))
        return RequestState.decode(key, raw) if raw is not None else None

    def _period(self, budget: str, period: str) -> PeriodState:
        state = self.periods.get((budget, period))
        if state is None:
            state = PeriodState(budget, period)
            self.periods[(budget, period)] = state
        return state

    def period_state(self, budget: str, period: str) -> PeriodState | None:
        return self.periods.get((budget, period))

    @property
    def open_reservations(self) -> int:
        return len(self._open)

    # -- applying ---------------------------------------------------------------
    def apply(self, entry: LedgerEntry, offset: int, *, max_time: float | None = None) -> ApplyResult:
        """Apply one entry at its ledger offset; idempotent for an offset it already reflects.

        ``max_time`` bounds a tick's time (its record's broker time plus the allowed clock skew), so that one
        tick from a clock that runs ahead cannot make every genuine entry late.
        """
        if entry.budget_id is not None and SHARD_MARK in entry.budget_id:
            self.touched.add((entry.budget_id, entry.period))  # its sums go home, even after a replay
        if offset <= self.meta.applied:
            return "replayed"
        self._last_offset = max(self._last_offset, offset)
        if entry.kind == "tick":
            self._tick(entry, offset, max_time)
            return "tick"
        assert entry.budget_id is not None  # the schema requires it for every other kind
        if _period_end(entry.period) + self.config.grace_s < self.meta.stream_time:
            return "late_period"
        if entry.kind == "partial":
            return self._merge(entry, offset)
        if entry.kind == "lease":
            answered, changed = self.leases.ask(entry, offset, self._period)
            if changed is not None:
                self._update_status(changed, offset)  # a month it opened is judged like any other
            return "applied" if answered else "duplicate"
        before = self._request((entry.budget_id, entry.request_id, entry.attempt))
        req_at = entry.occurred_at.timestamp()
        if self._late(before, req_at):
            return "late_horizon"
        if before is not None and before.ledger_offset >= offset:
            self._check_replayed(before, offset)
            return "replayed"
        after = self._next_state(before, entry, offset, req_at, entry.ttl_s or self.config.default_ttl_s)
        if after is None:
            self._cover(entry)
            return "duplicate"
        held = self.periods.get((after.budget, after.period))
        durable = held is not None and held.ledger_offset >= offset  # before _count moves it
        result = self._count(entry, before, after, offset)
        if result == "applied":
            self._put_request(before, after)
            if entry.kind == "reserve" and (before is None or before.est is None):
                self.leases.use(entry, offset, self._period(after.budget, after.period), period_durable=durable)
        self._cover(entry)
        return result

    def _cover(self, entry: LedgerEntry) -> None:
        """A reserve's request event, or a settle's usage event, is counted (or refused for good): the period's
        statuses cover its position."""
        if entry.source_partition is None or entry.source_offset is None or entry.kind not in ("reserve", "settle"):
            return
        assert entry.budget_id is not None
        period = self._period(entry.budget_id, entry.period)
        covers = period.covers if entry.kind == "reserve" else period.covers_usage
        if covers.get(entry.source_partition, -1) < entry.source_offset:
            covers[entry.source_partition] = entry.source_offset
            self._changes.period(period)
            self.touched.add((period.budget, period.period))

    def _late(self, state: RequestState | None, req_at: float) -> bool:
        """Past the dedupe horizon: the request's state may be swept, so an entry could no longer be deduplicated.

        A request's TTL is the one stored with its first entry (a settle may carry another: the price of the
        reported model, or a changed setting). The sweep forgets a state at its req_at + TTL + horizon, so an
        entry that finds no state is judged without a TTL: it cannot outlive a state that was swept.
        """
        if state is not None:
            return state.req_at + state.ttl_s + self.config.horizon_s < self.meta.stream_time
        return req_at + self.config.horizon_s < self.meta.stream_time

    def _check_replayed(self, before: RequestState, offset: int) -> None:
        """A replayed entry's request state is durable: by the write order, so is its period's record."""
        period = self.periods.get((before.budget, before.period))
        if period is None or period.ledger_offset < offset:
            # Impossible by the write order; counted, so a test can insist on zero.
            self.anomalies += 1
            log.error("ledger anomaly on partition %d at offset %d", self.partition, offset)

    def _next_state(
        self, state: RequestState | None, entry: LedgerEntry, offset: int, req_at: float, ttl: int
    ) -> RequestState | None:
        """The request's state after the entry, or None when the entry changes nothing (a duplicate)."""
        amount = entry.amount_pico_usd
        if state is None:
            assert entry.budget_id is not None
            fresh = RequestState(
                entry.budget_id, entry.request_id, entry.attempt, entry.period, req_at, ttl, ledger_offset=offset
            )
            if entry.kind == "reserve":
                fresh.est = amount
            else:
                fresh.act = amount
                fresh.manual = entry.kind == "adjust"
            return fresh
        if entry.kind == "reserve":
            if state.est is not None:
                return None
            # The settle came first: the reservation is absorbed (kept for the record only).
            return state.changed(est=amount, ledger_offset=offset)
        if state.act is not None:
            return None
        # A settle replaces the reservation, or the expired estimate (an adjustment).
        return state.changed(act=amount, ledger_offset=offset)

    def _count(
        self, entry: LedgerEntry, before: RequestState | None, after: RequestState, offset: int
    ) -> Literal["applied", "out_of_range"]:
        """Move the request's period by what the entry changes in the request's contribution."""
        pkey = (after.budget, after.period)
        period = self.periods.get(pkey) or PeriodState(*pkey)
        if period.ledger_offset >= offset:
            # A replay onto a period record that was durable before a crash: it reflects the entry already,
            # counted or refused (and then it says so).
            return "out_of_range" if offset in period.refused else "applied"
        settled = period.settled + after.settled_part - (before.settled_part if before else 0)
        reserved = period.reserved + after.reserved_part - (before.reserved_part if before else 0)
        self.periods[pkey] = period
        period.ledger_offset = offset
        self._changes.period(period)
        if abs(settled) + reserved > self.config.max_period_pico:
            # Refused whole: the sums do not change, and the period remembers the refusal for a replay.
            period.refused.append(offset)
            return "out_of_range"
        period.settled, period.reserved = settled, reserved
        if before is None:
            period.requests += 1
            if not entry.priced:
                period.unpriced += 1
        if entry.kind in ("settle", "adjust") and (before is None or before.act is None):
            period.settles += 1
        if before is not None and before.expired and entry.kind == "settle":
            period.adjusted += 1
        self._update_status(period, offset)
        return "applied"

    def _merge(self, entry: LedgerEntry, offset: int) -> ApplyResult:
        """A shard's sums reach its budget's home (:mod:`budgetflow.streams.aggregate.shardsums`)."""
        assert entry.budget_id is not None
        assert entry.shard_sum is not None
        period = self._period(entry.budget_id, entry.period)
        if period.ledger_offset >= offset:  # a replay onto a durable record
            return "out_of_range" if offset in period.refused else "applied"
        merged = merge(period, entry.shard_sum, self.config.max_period_pico)
        if merged is None:
            return "duplicate"
        period.ledger_offset = offset
        self._changes.period(period)
        if not merged:
            period.refused.append(offset)
            return "out_of_range"
        self._update_status(period, offset)
        return "applied"

    def _put_request(self, before: RequestState | None, after: RequestState) -> None:
        if self.observer is not None:
            self.observer(before, after)
        key = after.key
        if after.is_open:
            self._changes.opened(after, fresh=before is None)
            self._open[key] = after
            heapq.heappush(self._expiry, (after.req_at + after.ttl_s, key))
        else:
            self._changes.closed(after, was_open=(before is not None and before.is_open) or key in self._open)
            self._open.pop(key, None)

    def _update_status(self, period: PeriodState, offset: int) -> None:
        self.touched.add((period.budget, period.period))
        if SHARD_MARK in period.budget:
            return  # a shard has no status: its sums go home
        previous = period.status
        status = self.config.rules.next_status(previous, period.spend, self.policy_for(period.budget))
        if status == previous:
            return
        period.status = status
        if status not in period.events:
            period.events.append(status)
            self.status_changes.append(
                StatusChange(period.budget, period.period, status, previous, period.settled, period.reserved, offset)
            )

    def refresh_all(self) -> None:
        """Re-evaluate every period's status against the policies now, writing only those that change.

        After a recovery: a policy may have changed while this partition was away, or its re-evaluation may not
        have become durable before a crash.
        """
        for period in list(self.periods.values()):
            if SHARD_MARK in period.budget:
                continue  # no status of its own
            policy = self.policy_for(period.budget)
            if self.config.rules.next_status(period.status, period.spend, policy) != period.status:
                self._update_status(period, self._last_offset)
                self._changes.period(period)

    def refresh_policy(self, budget: str) -> None:
        """A policy changed: re-evaluate the budget's status in every period this partition holds."""
        for (owner, _), period in list(self.periods.items()):
            if owner == budget:
                self._update_status(period, self._last_offset)
                self._changes.period(period)

    # -- time -------------------------------------------------------------------
    def _tick(self, entry: LedgerEntry, offset: int, max_time: float | None) -> None:
        now = entry.occurred_at.timestamp()
        if max_time is not None and now > max_time:
            now = max_time  # a clock ahead of the broker's: stream time moves only as far as the broker vouches
        self.meta.stream_time = max(self.meta.stream_time, now)
        current = period_of(datetime.fromtimestamp(self.meta.stream_time, UTC))
        # Before its first tick a partition's period is the latest it holds entries of: a first tick that is
        # already in the next month (a worker that started late, a slow machine) is a rollover all the same.
        previous = self.meta.period or max((period for _, period in self.periods), default=None)
        if previous is not None and current > previous:
            self.rollover_to = current
            self._drop_old_periods(current)
        self.meta.period = current
        if entry.expire:
            # One tick may change a period several times (requests expiring, leases released): the period's
            # offset check must tell "already reflects this tick" (a replay) from "changed by it just now".
            live: set[tuple[str, str]] = set()
            self._expire(now, offset, live)
            self.leases.release(now, offset, self._period, live)
        if self.meta.stream_time - self._swept_at >= self.config.sweep_interval_s:
            self._swept_at = self.meta.stream_time
            self._sweep(self.meta.stream_time)

    def _expire(self, now: float, offset: int, live: set[tuple[str, str]]) -> None:
        deferred: list[tuple[float, RequestKey]] = []
        while self._expiry and self._expiry[0][0] <= now:
            item = heapq.heappop(self._expiry)
            state = self._open.get(item[1])
            if state is None or state.req_at + state.ttl_s > now:
                continue  # settled meanwhile, or a stale heap entry
            if state.ledger_offset >= offset:
                deferred.append(item)  # a replay: this state is already past the tick
                continue
            after = state.changed(expired=True, ledger_offset=offset)
            period = self._period(after.budget, after.period)
            pkey = (period.budget, period.period)
            if period.ledger_offset < offset or pkey in live:
                live.add(pkey)
                self.expirations += 1
                period.settled += after.settled_part - state.settled_part
                period.reserved += after.reserved_part - state.reserved_part
                period.expired += 1
                period.ledger_offset = offset
                self._update_status(period, offset)
                self._changes.period(period)
            self._put_request(state, after)
        for item in deferred:
            heapq.heappush(self._expiry, item)

    def _sweep(self, now: float) -> None:
        """Forget closed requests past TTL + horizon; later entries for them are late by rule."""
        for examined, (key, value) in enumerate(self.store.scan(REQUEST_PREFIX, start=self._sweep_cursor), start=1):
            _, (budget, request_id, attempt) = decode_key(key)
            state = RequestState.decode((budget, request_id, int(attempt)), value)
            if state.req_at + state.ttl_s + self.config.horizon_s < now and state.key not in self._changes.requests:
                self._changes.delete(key)
            if examined >= self.config.sweep_keys_per_tick:
                self._sweep_cursor = key + b"\x00"
                return
        self._sweep_cursor = None

    def _drop_old_periods(self, current: str) -> None:
        oldest = shift_period(current, -self.config.keep_periods)
        for budget, period in list(self.periods):
            if period < oldest:
                del self.periods[(budget, period)]
                self._changes.forget_period(budget, period)
                self.leases.forget_period(budget, period)

    # -- writing ----------------------------------------------------------------
    def drain(self) -> Changes:
        """The batch's changes in the order that makes a crash safe (:mod:`budgetflow.streams.aggregate.changes`)."""
        return self._changes.drain(self.meta, self._last_offset)

    def take_outputs(self) -> tuple[list[StatusChange], set[tuple[str, str]], str | None]:
        """Status changes, touched periods and a rollover since the last call (for publishing)."""
        shards = {pair for pair in self.touched if SHARD_MARK in pair[0]}
        self._shards_touched |= shards
        out = (self.status_changes, self.touched - shards, self.rollover_to)
        self.status_changes, self.touched, self.rollover_to = [], set(), None
        return out

    def take_partials(self) -> list[tuple[str, bytes]]:
        """(home budget, partial entry) for each shard month changed since the last call: its sums, sent home."""
        shards = self._shards_touched | {pair for pair in self.touched if SHARD_MARK in pair[0]}
        self.touched -= shards
        self._shards_touched = set()
        return partial_entries(self.periods, shards)

    def partials(self) -> list[tuple[str, bytes]]:
        """Every shard's sums this partition holds (sent home again after a recovery)."""
        return partial_entries(self.periods, [pair for pair in self.periods if SHARD_MARK in pair[0]])

    def budgets(self) -> Iterator[str]:
        """Every budget this partition has seen (not its shards: they have no status)."""
        return iter({budget for budget, _ in self.periods if SHARD_MARK not in budget})
