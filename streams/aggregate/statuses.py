"""What the aggregate tells the world after a batch: statuses, transitions, heartbeats.

Statuses are published for the current period only (the later of the clock and
stream time): on a change of status, when utilization crosses a step, on a
policy change, at rollover, and for a budget whose spend changed without a
publish for ``refresh_s``. ``seq`` is the last ledger offset the partition has
applied, so a view that keeps the highest seq per budget ignores a stale
writer after a rebalance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from budgetflow.schemas.events import Heartbeat, LeaseGrant, StatusName, StatusReason, period_of
from budgetflow.schemas.money import usd_string
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.serde import dumps
from budgetflow.streams.aggregate.ledger import PartitionLedger, StatusChange
from budgetflow.streams.rules.forecast import Forecast
from budgetflow.streams.rules.status import StatusRules, build_status

__all__ = ["Outgoing", "StatusPublisher"]

log = logging.getLogger(__name__)

_PHRASES = {
    "soft_limit": "reached its soft limit",
    "hard_limit": "reached its hard limit",
    "normal": "is back to normal",
    "rollover": "rolled over",
}


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record to send: topic role (``status``, ``events``, ``heartbeats``, ``leases``, ``ledger``), key, value."""

    role: str
    key: bytes
    value: bytes


@dataclass(slots=True)
class _Published:
    period: str
    status: StatusName
    step: int | None
    spend: int
    at: float
    covered: int  # the sum of the offsets its covers name: grows with every event newly covered


class StatusPublisher:
    """Decides which statuses to publish; remembers what it published (in memory only)."""

    def __init__(
        self,
        rules: StatusRules,
        policy_for: Callable[[str], BudgetPolicy],
        now: Callable[[], datetime],
        refresh_s: float,
        forecast: Callable[[PartitionLedger, str, str], Forecast] | None = None,
        on_publish: Callable[[StatusReason], None] | None = None,
    ) -> None:
        self.rules = rules
        self.policy_for = policy_for
        self.now = now
        self.refresh_s = refresh_s
        self.forecast = forecast
        self.on_publish = on_publish
        self._last: dict[str, _Published] = {}
        self._dirty: set[str] = set()

    def current_period(self, ledger: PartitionLedger) -> str:
        stream = datetime.fromtimestamp(ledger.meta.stream_time, UTC)
        return period_of(max(self.now(), stream))

    def _status(self, ledger: PartitionLedger, budget: str, period: str, reason: StatusReason) -> Outgoing:
        state = ledger.period_state(budget, period)
        policy = self.policy_for(budget)
        covers: dict[int, int] = {}
        covers_usage: dict[int, int] = {}
        if state is None:
            settled = reserved = 0
            status = self.rules.next_status("normal", 0, policy)
        else:
            settled, reserved, status = state.settled, state.reserved, state.status
            covers, covers_usage = state.covers, state.covers_usage
        last = self._last.get(budget)
        previous = last.status if last is not None and last.period == period else None
        record = build_status(
            budget_id=budget,
            period=period,
            status=status,
            previous_status=previous,
            settled=settled,
            reserved=reserved,
            policy=policy,
            as_of=self.now(),
            reason=reason,
            partition=ledger.partition,
            seq=ledger.meta.applied if ledger.meta.applied >= 0 else -1,
            covers=covers,
            covers_usage=covers_usage,
        )
        if self.forecast is not None:
            projection = self.forecast(ledger, budget, period)
            hard_at = projection.hard_limit_at
            record = record.model_copy(
                update={
                    "projected_month_end_usd": projection.month_end_pico,
                    "projected_hard_limit_at": None if hard_at is None else datetime.fromtimestamp(hard_at, UTC),
                }
            )
        if self.on_publish is not None:
            self.on_publish(reason)
        spend = settled + reserved
        self._last[budget] = _Published(
            period,
            status,
            self.rules.step_of(spend, policy.monthly_limit_usd),
            spend,
            time.monotonic(),
            _covered(covers, covers_usage),
        )
        self._dirty.discard(budget)
        return Outgoing("status", budget.encode(), dumps(record))

    def after_batch(
        self,
        ledger: PartitionLedger,
        changes: list[StatusChange],
        touched: set[tuple[str, str]],
        rollover: str | None,
        policy_changed: Iterable[str] = (),
        known_budgets: Iterable[str] = (),
    ) -> list[Outgoing]:
        """Statuses and transition events for what one batch changed on one partition."""
        out = []
        for change in changes:
            self._log_transition(change.budget, change.period, change.event, change.settled + change.reserved)
            out.append(self._event(change))
        current = self.current_period(ledger)
        done: set[str] = set()
        if rollover is not None:
            budgets = set(ledger.budgets()) | set(known_budgets)
            for budget in sorted(budgets):
                state = ledger.period_state(budget, current)
                self._log_transition(budget, current, "rollover", state.spend if state else 0)
                out.append(self._status(ledger, budget, current, "rollover"))
                done.add(budget)
        for budget in sorted(set(policy_changed) - done):
            out.append(self._status(ledger, budget, current, "policy"))
            done.add(budget)
        for budget, period in sorted(touched):
            if period != current or budget in done:
                continue
            out.extend(self._maybe(ledger, budget, period))
            done.add(budget)
        return out

    def _log_transition(self, budget: str, period: str, event: str, spend: int) -> None:
        """One INFO line per transition, for an operator reading the aggregate's log (amounts in decimal USD)."""
        limit = self.policy_for(budget).monthly_limit_usd
        log.info(
            "budget %s %s in %s: spend $%s of limit %s (event %s)",
            budget,
            _PHRASES.get(event, event),
            period,
            usd_string(spend),
            "none" if limit is None else f"${usd_string(limit)}",
            event,
        )

    def _maybe(self, ledger: PartitionLedger, budget: str, period: str) -> list[Outgoing]:
        state = ledger.period_state(budget, period)
        assert state is not None
        last = self._last.get(budget)
        policy = self.policy_for(budget)
        step = self.rules.step_of(state.spend, policy.monthly_limit_usd)
        if last is None or last.period != period:
            return [self._status(ledger, budget, period, "refresh")]
        if last.status != state.status:
            return [self._status(ledger, budget, period, "threshold")]
        if last.step != step:
            return [self._status(ledger, budget, period, "step")]
        if last.spend != state.spend or last.covered != _covered(state.covers, state.covers_usage):
            # Refreshed within refresh_s: a spend not yet published, or events counted that no status says it
            # counts (a failed attempt settled at 0: routers count its admission until a status covers it).
            self._dirty.add(budget)
        return []

    def refresh(self, ledger: PartitionLedger, budgets: Iterable[str] | None = None) -> list[Outgoing]:
        """Publish budgets whose last value has not reached the topic for ``refresh_s`` (or the given ones)."""
        current = self.current_period(ledger)
        if budgets is not None:
            return [self._status(ledger, b, current, "refresh") for b in sorted(set(budgets))]
        now = time.monotonic()
        due = [b for b in self._dirty if now - self._last[b].at >= self.refresh_s]
        owned = set(ledger.budgets())
        return [self._status(ledger, b, current, "refresh") for b in sorted(due) if b in owned]

    def forget(self, budgets: Iterable[str]) -> None:
        for budget in budgets:
            self._last.pop(budget, None)
            self._dirty.discard(budget)

    @staticmethod
    def _event(change: StatusChange) -> Outgoing:
        value = {
            "v": 1,
            "budget_id": change.budget,
            "period": change.period,
            "event": change.event,
            "previous_status": change.previous,
            "spend_usd": usd_string(change.settled + change.reserved),
            "settled_usd": usd_string(change.settled),
            "reserved_usd": usd_string(change.reserved),
            "seq": change.offset,
        }
        return Outgoing("events", f"{change.budget}:{change.period}:{change.event}".encode(), dumps(value))

    def events_of(self, ledger: PartitionLedger, period: str, since_offset: int = 0) -> list[Outgoing]:
        """Transitions recorded for a period by entries at or after ``since_offset`` (re-announced after a recovery)."""
        out = []
        for (budget, p), state in ledger.periods.items():
            if p != period or state.ledger_offset < since_offset:
                continue
            for event in state.events:
                out.append(
                    Outgoing(
                        "events",
                        f"{budget}:{p}:{event}".encode(),
                        dumps(
                            {
                                "v": 1,
                                "budget_id": budget,
                                "period": p,
                                "event": event,
                                "previous_status": None,
                                "spend_usd": usd_string(state.spend),
                                "settled_usd": usd_string(state.settled),
                                "reserved_usd": usd_string(state.reserved),
                                "seq": state.ledger_offset,
                                "replayed": True,
                            }
                        ),
                    )
                )
        return out

    def heartbeat(
        self, ledger: PartitionLedger, lag_s: float, enrich_lag_s: float | None, owner: str | None = None
    ) -> Outgoing:
        record = Heartbeat(
            partition=ledger.partition,
            as_of=self.now(),
            stream_time=datetime.fromtimestamp(max(ledger.meta.stream_time, 946_684_800), UTC),
            lag_s=max(lag_s, 0.0),
            enrich_lag_s=enrich_lag_s,
            owner=owner,
        )
        return Outgoing("heartbeats", str(ledger.partition).encode(), dumps(record))

    def grants(self, ledger: PartitionLedger) -> list[Outgoing]:
        """The leases a batch changed, for the routers that hold them (``budget|router``, compacted)."""
        now = self.now()
        return [
            Outgoing(
                "leases",
                f"{lease.budget}|{lease.router}".encode(),
                dumps(
                    LeaseGrant(
                        budget_id=lease.budget,
                        period=lease.period,
                        router=lease.router,
                        epoch=lease.epoch,
                        granted_usd=lease.granted,
                        used_usd=lease.used,
                        expires_at=datetime.fromtimestamp(max(lease.expires_at, 946_684_800), UTC),
                        asks=lease.asks,
                        as_of=now,
                    )
                ),
            )
            for lease in ledger.leases.take_changed()
        ]


def _covered(covers: dict[int, int], covers_usage: dict[int, int]) -> int:
    return sum(covers.values()) + sum(covers_usage.values())
