"""The status rules: thresholds with hysteresis, utilization steps, the BudgetStatus record.

All comparisons are exact (integers and fractions of pico-dollars); the
utilization on the wire is a float for display and routing only.
"""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from fractions import Fraction

from budgetflow.schemas.events import BudgetStatus, StatusName, StatusReason
from budgetflow.schemas.periods import next_month_start
from budgetflow.schemas.policy import BudgetPolicy

__all__ = ["STATUS_RANK", "StatusRules", "build_status", "utilization", "utilization_percent"]

STATUS_RANK: dict[str, int] = {"normal": 0, "soft_limit": 1, "hard_limit": 2}
"""How severe a status is: the order routers prefer budgets in, and the value of the status gauge."""


def utilization(spend: int, limit: int | None) -> Fraction | None:
    """spend / limit × 100, exactly, for the step rule; None when unlimited; a limit of 0 reads as 100 % (and
    grows with any spend, so that each step past it is still seen)."""
    if limit is None:
        return None
    if limit == 0:
        return Fraction(100) if spend <= 0 else Fraction(100) + Fraction(spend)
    return Fraction(100 * spend, limit)


def utilization_percent(spend: int, limit: int | None) -> float | None:
    """The utilization shown to people and routers: None when unlimited, 100 for a limit of 0, never below 0 (a
    credit may take a month's spend below zero; spend says so exactly)."""
    if limit is None:
        return None
    if limit == 0:
        return 100.0
    return max(0.0, spend * 100 / limit)


class StatusRules:
    """The status rules (docs/architecture.md, "Statuses") with the configured hysteresis and step, in exact integer
    arithmetic."""

    # Thresholds in millionths of a percent point: hysteresis and step may have up to 6 decimals.
    _SCALE = 1_000_000

    def __init__(self, hysteresis_points: Decimal = Decimal(1), step_points: Decimal = Decimal(1)) -> None:
        self._h = int(Fraction(hysteresis_points) * self._SCALE)
        self._step = Fraction(step_points)

    def next_status(self, previous: StatusName, spend: int, policy: BudgetPolicy) -> StatusName:
        """hard at ≥ 100 %, soft at ≥ the soft limit; a status drops only below threshold − hysteresis."""
        limit = policy.monthly_limit_usd
        if limit is None:
            return "normal"
        if limit == 0:
            return "hard_limit"
        # u >= x  <=>  100 * SCALE * spend >= x * SCALE * limit, all in integers
        scaled = 100 * self._SCALE * spend
        hard = 100 * self._SCALE * limit
        soft = policy.soft_limit_percent * self._SCALE * limit
        band = self._h * limit
        if scaled >= hard or (previous == "hard_limit" and scaled >= hard - band):
            return "hard_limit"
        if scaled >= soft or (STATUS_RANK[previous] >= 1 and scaled >= soft - band):
            return "soft_limit"
        return "normal"

    def step_of(self, spend: int, limit: int | None) -> int | None:
        """Which utilization step a spend is in (a publish happens when it changes)."""
        u = utilization(spend, limit)
        return None if u is None else math.floor(u / self._step)


def build_status(
    *,
    budget_id: str,
    period: str,
    status: StatusName,
    previous_status: StatusName | None,
    settled: int,
    reserved: int,
    policy: BudgetPolicy,
    as_of: datetime,
    reason: StatusReason,
    partition: int,
    seq: int,
    covers: dict[int, int] | None = None,
    covers_usage: dict[int, int] | None = None,
) -> BudgetStatus:
    """The record routers read, from a period's exact sums (and the events they count, ``covers``)."""
    spend = settled + reserved
    limit = policy.monthly_limit_usd
    u = utilization_percent(spend, limit)
    return BudgetStatus(
        budget_id=budget_id,
        period=period,
        status=status,
        previous_status=previous_status,
        spend_usd=spend,
        settled_usd=settled,
        reserved_usd=reserved,
        limit_usd=limit,
        remaining_usd=None if limit is None else max(limit - spend, 0),
        utilization_percent=None if u is None else round(u, 6),
        soft_limit_percent=policy.soft_limit_percent,
        hard_limit_action=policy.hard_limit_action,
        as_of=as_of,
        next_reset=next_month_start(period),
        reason=reason,
        partition=partition,
        seq=seq,
        covers=covers or {},
        covers_usage=covers_usage or {},
    )
