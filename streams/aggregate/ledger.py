"""The exact ledger of one partition: spend per (budget, period) and state per request.

Pure state, no Kafka: the aggregate worker feeds it ledger entries with their
offsets, writes what :meth:`PartitionLedger.drain` returns to the partition's
changelog (in that order, through one idempotent producer), then to the local
store, then commits the offsets.

Exactly once comes from idempotent state (design.md, Exactly once):

* every record remembers the last ledger offset it reflects (``o``) and skips
  an entry it already reflects; entry ids are deterministic, so a redelivered
  entry finds its request's state and changes nothing;
* a period record's change is the difference between its request's
  contribution after and before the entry, so it needs the request's state
  *before* the entry;
* a batch's changes are written in a fixed order: period records, then
  request records (closed before open), then the partition's meta record
  (``applied``: the last offset of the batch), then deletions. A crash leaves
  a prefix of that order durable. If a request record of the batch is durable,
  every period record of the batch is too, so on replay a period never needs a
  request state that is already past the entry; entries up to ``applied`` are
  skipped outright. Replaying any suffix of the ledger after a crash therefore
  leaves the same state (a property test crashes at every prefix).
"""

from __future__ import annotations

import functools
import heapq
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from budgetflow.schemas.events import LedgerEntry, StatusName, period_of
from budgetflow.schemas.money import MAX_PERIOD_PICO
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.serde import dumps, loads
from budgetflow.streams.aggregate.store import Store
from budgetflow.streams.rules.clock import next_month_start
from budgetflow.streams.rules.status import StatusRules

if TYPE_CHECKING:
    from budgetflow.schemas.settings import Settings

__all__ = [
    "LedgerConfig",
    "Outcome",
    "PartitionLedger",
    "PeriodState",
    "RequestState",
    "Transition",
    "decode_key",
]

log = logging.getLogger(__name__)

P_PREFIX = b"p|"
O_PREFIX = b"o|"
R_PREFIX = b"r|"
META_KEY = b"m|"
SEP = b"\x1f"  # neither budget ids nor request ids may contain control characters

Outcome = Literal["applied", "duplicate", "replayed", "late_period", "late_horizon", "out_of_range", "tick"]
_INT64 = 1 << 63


def _wide(value: int) -> int | str:
    """An amount for the state's JSON: orjson encodes 64 bits, a period's sums may be larger (MAX_PERIOD_PICO)."""
    return value if -_INT64 < value < _INT64 else str(value)


RequestKey = tuple[str, str, int]


@dataclass(slots=True)
class PeriodState:
    """One budget's month: exact sums, counts, and the status state machine."""

    budget: str
    period: str
    settled: int = 0
    reserved: int = 0
    requests: int = 0
    settles: int = 0
    expired: int = 0
    adjusted: int = 0
    unpriced: int = 0
    status: StatusName = "normal"
    events: list[str] = field(default_factory=list)
    o: int = -1
    # Offsets of entries refused as out_of_range since the partition's last durable batch: a replay after a
    # crash must refuse them again even when this record (written first) is durable and its sums are past them.
    refused: list[int] = field(default_factory=list)

    @property
    def spend(self) -> int:
        return self.settled + self.reserved

    def encode(self) -> bytes:
        return dumps(
            [
                _wide(self.settled),
                _wide(self.reserved),
                self.requests,
                self.settles,
                self.expired,
                self.adjusted,
                self.unpriced,
                self.status,
                self.events,
                self.o,
                self.refused,
            ]
        )

    @classmethod
    def decode(cls, budget: str, period: str, raw: bytes) -> PeriodState:
        s, r, n, st, ex, ad, un, status, events, o, *refused = loads(raw)  # stores before refusals lack the last
        return cls(
            budget,
            period,
            int(s),
            int(r),
            n,
            st,
            ex,
            ad,
            un,
            status,
            list(events),
            o,
            list(refused[0]) if refused else [],
        )


@dataclass(slots=True)
class RequestState:
    """One (budget, request, attempt): its estimate, its actual, and what it contributes."""

    budget: str
    request_id: str
    attempt: int
    period: str
    req_at: float
    ttl_s: int
    est: int | None = None
    act: int | None = None
    expired: bool = False
    manual: bool = False
    o: int = -1

    @property
    def key(self) -> RequestKey:
        return (self.budget, self.request_id, self.attempt)

    @property
    def is_open(self) -> bool:
        return self.est is not None and self.act is None and not self.expired

    @property
    def settled_part(self) -> int:
        if self.act is not None:
            return self.act
        if self.expired and self.est is not None:
            return self.est
        return 0

    @property
    def reserved_part(self) -> int:
        return self.est if self.is_open and self.est is not None else 0

    def encode(self) -> bytes:
        return dumps([self.period, self.req_at, self.ttl_s, self.est, self.act, self.expired, self.manual, self.o])

    @classmethod
    def decode(cls, key: RequestKey, raw: bytes) -> RequestState:
        period, req_at, ttl, est, act, expired, manual, o = loads(raw)
        return cls(key[0], key[1], key[2], period, req_at, ttl, est, act, expired, manual, o)


@dataclass(slots=True)
class Meta:
    applied: int = -1
    stream_time: float = 0.0
    period: str | None = None

    def encode(self) -> bytes:
        return dumps([self.applied, self.stream_time, self.period])

    @classmethod
    def decode(cls, raw: bytes) -> Meta:
        applied, stream_time, period = loads(raw)
        return cls(applied, stream_time, period)


@dataclass(frozen=True, slots=True)
class Transition:
    """A status change, announced once per budget, period and event."""

    budget: str
    period: str
    event: str
    previous: StatusName
    settled: int
    reserved: int
    offset: int


@dataclass(frozen=True)
class LedgerConfig:
    """The time rules of design.md, in seconds."""

    horizon_s: int = 86_400
    grace_s: int = 7 * 86_400
    default_ttl_s: int = 3_600
    rules: StatusRules = field(default_factory=StatusRules)
    sweep_keys_per_tick: int = 20_000
    sweep_interval_s: float = 600.0
    keep_periods: int = 13
    max_period_pico: int = MAX_PERIOD_PICO

    @classmethod
    def from_settings(cls, settings: Settings) -> LedgerConfig:
        return cls(
            horizon_s=settings.dedupe_horizon_s,
            grace_s=settings.period_grace_s,
            default_ttl_s=settings.reservation.ttl_s,
            rules=StatusRules(settings.status.hysteresis_points, settings.status.step_points),
            sweep_keys_per_tick=settings.worker.sweep_keys_per_tick,
        )


def _request_key(prefix: bytes, key: RequestKey) -> bytes:
    return prefix + key[0].encode() + SEP + key[1].encode() + SEP + str(key[2]).encode()


def _period_key(budget: str, period: str) -> bytes:
    return P_PREFIX + budget.encode() + SEP + period.encode()


def decode_key(raw: bytes) -> tuple[str, tuple[str, ...]]:
    """(kind, parts) of a state key: ``('p', (budget, period))``, ``('r', (budget, request, attempt))``, ..."""
    kind = raw[:1].decode()
    if raw == META_KEY:
        return "m", ()
    return kind, tuple(part.decode() for part in raw[2:].split(SEP))


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
        self.meta = Meta()
        self.periods: dict[tuple[str, str], PeriodState] = {}
        self._open: dict[RequestKey, RequestState] = {}
        self._expiry: list[tuple[float, RequestKey]] = []
        # Changes of the current batch, not yet drained.
        self._batch: dict[RequestKey, RequestState | None] = {}
        self._dirty_periods: dict[tuple[str, str], PeriodState] = {}
        self._closed: dict[RequestKey, RequestState] = {}
        self._opened: dict[RequestKey, RequestState] = {}
        self._unopened: set[RequestKey] = set()
        self._fresh: set[RequestKey] = set()  # opened in this batch: no open record of theirs is durable
        self._deletes: dict[bytes, None] = {}
        self._last_offset = -1
        self._sweep_cursor: bytes | None = None
        self._swept_at = 0.0
        # What the worker publishes after a batch.
        self.transitions: list[Transition] = []
        self.touched: set[tuple[str, str]] = set()
        self.rollover_to: str | None = None
        self.anomalies = 0
        self.expirations = 0
        # Called with (before, after) at every change of a request's state, after its period took the
        # difference: what a replay needs to say which request made which spend (budgetflow report).
        self.observer: Callable[[RequestState | None, RequestState], None] | None = None
        self.load()

    # -- loading ----------------------------------------------------------------
    def load(self) -> None:
        """Rebuild the in-memory indexes (periods, open reservations, meta) from the store."""
        raw = self.store.get(META_KEY)
        self.meta = Meta.decode(raw) if raw is not None else Meta()
        self.periods = {}
        for key, value in self.store.scan(P_PREFIX):
            _, (budget, period) = decode_key(key)
            self.periods[(budget, period)] = PeriodState.decode(budget, period, value)
        self._open = {}
        for key, value in self.store.scan(O_PREFIX):
            _, (budget, request_id, attempt) = decode_key(key)
            rkey = (budget, request_id, int(attempt))
            state = RequestState.decode(rkey, value)
            closed_raw = self.store.get(_request_key(R_PREFIX, rkey))
            if closed_raw is not None and RequestState.decode(rkey, closed_raw).o >= state.o:
                # A crash between writing the closed record and deleting the open one.
                self._deletes[key] = None
                continue
            self._open[rkey] = state
        self._expiry = [(s.req_at + s.ttl_s, k) for k, s in self._open.items()]
        heapq.heapify(self._expiry)
        self._last_offset = self.meta.applied

    # -- lookups ----------------------------------------------------------------
    def _request(self, key: RequestKey) -> RequestState | None:
        if key in self._batch:
            return self._batch[key]
        state = self._open.get(key)
        if state is not None:
            return state
        raw = self.store.get(_request_key(R_PREFIX, key))
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
    def apply(self, entry: LedgerEntry, offset: int, *, max_time: float | None = None) -> Outcome:
        """Apply one entry at its ledger offset; idempotent for an offset it already reflects.

        ``max_time`` bounds a tick's time (its record's broker time plus the allowed clock skew), so that one
        tick from a clock that runs ahead cannot make every genuine entry late.
        """
        if offset <= self.meta.applied:
            return "replayed"
        self._last_offset = max(self._last_offset, offset)
        if entry.kind == "tick":
            self._tick(entry, offset, max_time)
            return "tick"
        assert entry.budget_id is not None  # the schema requires it for every other kind
        if _period_end(entry.period) + self.config.grace_s < self.meta.stream_time:
            return "late_period"
        key = (entry.budget_id, entry.request_id, entry.attempt)
        before = self._request(key)
        req_at = entry.occurred_at.timestamp()
        ttl = entry.ttl_s or self.config.default_ttl_s
        if self._late(before, req_at):
            return "late_horizon"
        if before is not None and before.o >= offset:
            period = self.periods.get((entry.budget_id, before.period))
            if period is None or period.o < offset:
                # Impossible by the write order; counted, so a test can insist on zero.
                self.anomalies += 1
                log.error("ledger anomaly on partition %d at offset %d", self.partition, offset)
            return "replayed"
        after = self._next_state(before, entry, offset, req_at, ttl)
        if after is None:
            return "duplicate"
        pkey = (after.budget, after.period)
        period = self.periods.get(pkey) or PeriodState(*pkey)
        if period.o >= offset and offset in period.refused:
            return "out_of_range"  # refused before a crash, and the period record says so
        if period.o < offset:
            settled = period.settled + after.settled_part - (before.settled_part if before else 0)
            reserved = period.reserved + after.reserved_part - (before.reserved_part if before else 0)
            if abs(settled) + reserved > self.config.max_period_pico:
                # Refused whole: the sums do not change, and the period remembers the refusal for a replay.
                self.periods[pkey] = period
                period.refused.append(offset)
                period.o = offset
                self._dirty_periods[pkey] = period
                return "out_of_range"
            self.periods[pkey] = period
            period.settled, period.reserved = settled, reserved
            if before is None:
                period.requests += 1
                if not entry.priced:
                    period.unpriced += 1
            if entry.kind in ("settle", "adjust") and (before is None or before.act is None):
                period.settles += 1
            if before is not None and before.expired and entry.kind == "settle":
                period.adjusted += 1
            period.o = offset
            self._update_status(period, offset)
            self._dirty_periods[(period.budget, period.period)] = period
        self._put_request(before, after)
        return "applied"

    def _late(self, state: RequestState | None, req_at: float) -> bool:
        """Past the dedupe horizon: the request's state may be swept, so an entry could no longer be deduplicated.

        A request's TTL is the one stored with its first entry (a settle may carry another: the price of the
        reported model, or a changed setting). The sweep forgets a state at its req_at + TTL + horizon, so an
        entry that finds no state is judged without a TTL: it cannot outlive a state that was swept.
        """
        if state is not None:
            return state.req_at + state.ttl_s + self.config.horizon_s < self.meta.stream_time
        return req_at + self.config.horizon_s < self.meta.stream_time

    def _next_state(
        self, state: RequestState | None, entry: LedgerEntry, offset: int, req_at: float, ttl: int
    ) -> RequestState | None:
        """The request's state after the entry, or None when the entry changes nothing (a duplicate)."""
        amount = entry.amount_pico_usd
        if state is None:
            assert entry.budget_id is not None
            fresh = RequestState(entry.budget_id, entry.request_id, entry.attempt, entry.period, req_at, ttl, o=offset)
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
            return _replace(state, est=amount, o=offset)
        if state.act is not None:
            return None
        # A settle replaces the reservation, or the expired estimate (an adjustment).
        return _replace(state, act=amount, o=offset)

    def _put_request(self, before: RequestState | None, after: RequestState) -> None:
        if self.observer is not None:
            self.observer(before, after)
        key = after.key
        self._batch[key] = after
        if after.is_open:
            if before is None:
                self._fresh.add(key)
            self._open[key] = after
            self._opened[key] = after
            self._closed.pop(key, None)
            heapq.heappush(self._expiry, (after.req_at + after.ttl_s, key))
        else:
            self._closed[key] = after
            self._opened.pop(key, None)
            if (before is not None and before.is_open) or key in self._open:
                self._open.pop(key, None)
                self._unopened.add(key)

    def _update_status(self, period: PeriodState, offset: int) -> None:
        previous = period.status
        status = self.config.rules.next_status(previous, period.spend, self.policy_for(period.budget))
        self.touched.add((period.budget, period.period))
        if status == previous:
            return
        period.status = status
        if status not in period.events:
            period.events.append(status)
            self.transitions.append(
                Transition(period.budget, period.period, status, previous, period.settled, period.reserved, offset)
            )

    def refresh_all(self) -> None:
        """Re-evaluate every period's status against the policies now, writing only those that change.

        After a recovery: a policy may have changed while this partition was away, or its re-evaluation may not
        have become durable before a crash.
        """
        for period in list(self.periods.values()):
            policy = self.policy_for(period.budget)
            if self.config.rules.next_status(period.status, period.spend, policy) != period.status:
                self._update_status(period, self._last_offset)
                self._dirty_periods[(period.budget, period.period)] = period

    def refresh_policy(self, budget: str) -> None:
        """A policy changed: re-evaluate the budget's status in every period this partition holds."""
        for (owner, _), period in list(self.periods.items()):
            if owner == budget:
                self._update_status(period, self._last_offset)
                self._dirty_periods[(period.budget, period.period)] = period

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
            self._expire(now, offset)
        if self.meta.stream_time - self._swept_at >= self.config.sweep_interval_s:
            self._swept_at = self.meta.stream_time
            self._sweep(self.meta.stream_time)

    def _expire(self, now: float, offset: int) -> None:
        deferred: list[tuple[float, RequestKey]] = []
        # One tick may expire several requests of one period: the period's offset check
        # must tell "already reflects this tick" (a replay) from "changed by it just now".
        live: set[tuple[str, str]] = set()
        while self._expiry and self._expiry[0][0] <= now:
            item = heapq.heappop(self._expiry)
            state = self._open.get(item[1])
            if state is None or state.req_at + state.ttl_s > now:
                continue  # settled meanwhile, or a stale heap entry
            if state.o >= offset:
                deferred.append(item)  # a replay: this state is already past the tick
                continue
            after = _replace(state, expired=True, o=offset)
            period = self._period(after.budget, after.period)
            pkey = (period.budget, period.period)
            if period.o < offset or pkey in live:
                live.add(pkey)
                self.expirations += 1
                period.settled += after.settled_part - state.settled_part
                period.reserved += after.reserved_part - state.reserved_part
                period.expired += 1
                period.o = offset
                self._update_status(period, offset)
                self._dirty_periods[(period.budget, period.period)] = period
            self._put_request(state, after)
        for item in deferred:
            heapq.heappush(self._expiry, item)

    def _sweep(self, now: float) -> None:
        """Forget closed requests past TTL + horizon; later entries for them are late by rule."""
        for examined, (key, value) in enumerate(self.store.scan(R_PREFIX, start=self._sweep_cursor), start=1):
            _, (budget, request_id, attempt) = decode_key(key)
            state = RequestState.decode((budget, request_id, int(attempt)), value)
            if state.req_at + state.ttl_s + self.config.horizon_s < now and state.key not in self._batch:
                self._deletes[key] = None
            if examined >= self.config.sweep_keys_per_tick:
                self._sweep_cursor = key + b"\x00"
                return
        self._sweep_cursor = None

    def _drop_old_periods(self, current: str) -> None:
        year, month = int(current[:4]), int(current[5:7])
        index = year * 12 + month - 1 - self.config.keep_periods
        oldest = f"{index // 12:04d}-{index % 12 + 1:02d}"
        for budget, period in list(self.periods):
            if period < oldest:
                del self.periods[(budget, period)]
                self._dirty_periods.pop((budget, period), None)
                self._deletes[_period_key(budget, period)] = None

    # -- writing ----------------------------------------------------------------
    def drain(self) -> list[tuple[bytes, bytes | None]]:
        """The batch's changes in the order that makes a crash safe (see the module docstring)."""
        changes: list[tuple[bytes, bytes | None]] = []
        for period in self._dirty_periods.values():
            # Refusals at or before the last durable batch are never replayed again.
            period.refused = [o for o in period.refused if o > self.meta.applied]
            changes.append((_period_key(period.budget, period.period), period.encode()))
        for key, state in self._closed.items():
            changes.append((_request_key(R_PREFIX, key), state.encode()))
        for key, state in self._opened.items():
            changes.append((_request_key(O_PREFIX, key), state.encode()))
        for key in self._unopened:
            if key not in self._opened and key not in self._fresh:
                changes.append((_request_key(O_PREFIX, key), None))
        if changes or self._last_offset > self.meta.applied or self._deletes:
            self.meta.applied = self._last_offset
            changes.append((META_KEY, self.meta.encode()))
        changes.extend((key, None) for key in self._deletes)
        self._batch.clear()
        self._dirty_periods.clear()
        self._closed.clear()
        self._opened.clear()
        self._unopened.clear()
        self._fresh.clear()
        self._deletes.clear()
        return changes

    def take_outputs(self) -> tuple[list[Transition], set[tuple[str, str]], str | None]:
        """Transitions, touched periods and a rollover since the last call (for publishing)."""
        out = (self.transitions, self.touched, self.rollover_to)
        self.transitions, self.touched, self.rollover_to = [], set(), None
        return out

    def budgets(self) -> Iterator[str]:
        """Every budget this partition has seen."""
        return iter({budget for budget, _ in self.periods})


def _replace(state: RequestState, **changes: object) -> RequestState:
    copy = RequestState(
        state.budget,
        state.request_id,
        state.attempt,
        state.period,
        state.req_at,
        state.ttl_s,
        state.est,
        state.act,
        state.expired,
        state.manual,
        state.o,
    )
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy
