"""What a BudgetView keeps of each status and heartbeat, and the router's state it makes of a status."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from budgetflow.schemas.events import period_of
from budgetflow.schemas.periods import next_month_start
from budgetflow.streams.gateway.admissions import Covers, Seen
from budgetflow.streams.gateway.routing import Action, BudgetState
from budgetflow.streams.rules.status import utilization_percent

__all__ = ["BeatRecord", "StatusRecord", "published_state", "rolled_over"]


@dataclass(slots=True)
class StatusRecord:
    """A status record kept compactly (a view holds one per budget)."""

    seq: int
    period: str
    status: str
    spend: int
    limit: int | None
    soft: int
    action: Action
    partition: int
    as_of: float
    reset_ts: float
    covers: Covers  # NO_COVERS (shared) when the status says none: a view holds 100,000 of these
    base: BudgetState | None = None  # built on first use, then shared by every decision on the budget

    def seen(self) -> Seen:
        """What this status says for the router's admissions."""
        return Seen(self.period, self.as_of, self.covers)


@dataclass(slots=True)
class BeatRecord:
    as_of: float
    lag_s: float
    owner: str | None = None


def published_state(budget_id: str, record: StatusRecord) -> BudgetState:
    """A status record as a router's state (built once per record and kept on it)."""
    if record.base is None:
        record.base = BudgetState(
            budget_id=budget_id,
            period=record.period,
            status=record.status,
            spend_pico=record.spend,
            limit_pico=record.limit,
            utilization=utilization_percent(record.spend, record.limit),
            soft_limit_percent=record.soft,
            hard_limit_action=record.action,
            next_reset=next_month_start(record.period),
        )
    return record.base


def rolled_over(state: BudgetState, moment: datetime) -> BudgetState:
    """Rollover on read: last month's status says nothing about this one, which starts normal and unspent."""
    current = period_of(moment)
    return replace(
        state,
        period=current,
        status="normal",
        spend_pico=0,
        utilization=utilization_percent(0, state.limit_pico),
        next_reset=next_month_start(current),
    )
