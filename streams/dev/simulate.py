"""A month of traffic against one budget, with and without the soft-limit shift to local models.

Uses the real routing rule (:func:`budgetflow.streams.gateway.routing.decide`) and the
real status rules; statuses reach the router at each utilization step, as the
aggregate publishes them. The figure of merit is the original spec's: the
cloud spend while the budget is in its 80-100 % band, measured over the window
in which the unshifted run crosses that band.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.streams.gateway.routing import BudgetState, Candidate, decide
from budgetflow.streams.rules.status import StatusRules

__all__ = ["ShiftResult", "simulate_shift"]

CLOUD = Candidate("gpt-4o", "cloud", 1.0)
LOCAL = Candidate("llama3.1:8b", "local", 0.5)
MONTH_S = 30 * 86_400


@dataclass(frozen=True)
class _Run:
    cloud_spend: list[tuple[float, int]]  # (time, cumulative cloud spend) after each cloud request
    cloud_requests: int
    local_requests: int
    rejected: int

    def spend_between(self, start: float, end: float) -> int:
        before = max((s for t, s in self.cloud_spend if t < start), default=0)
        upto = max((s for t, s in self.cloud_spend if t < end), default=0)
        return upto - before

    def first_time_at(self, amount: int) -> float | None:
        return next((t for t, s in self.cloud_spend if s >= amount), None)


@dataclass(frozen=True)
class ShiftResult:
    requests: int
    limit_pico: int
    band_start_s: float
    band_end_s: float
    without_band_spend: int
    with_band_spend: int
    without_total: int
    with_total: int
    without_cloud_requests: int
    with_cloud_requests: int

    @property
    def reduction_percent(self) -> float:
        return (1 - self.with_band_spend / self.without_band_spend) * 100


def _published(policy: BudgetPolicy, status: str, spend: int) -> BudgetState:
    """The budget's state as the aggregate publishes it to the router (the month is November 2026)."""
    limit = policy.monthly_limit_usd
    assert limit is not None
    return BudgetState(
        "team:a",
        "2026-11",
        status,
        spend,
        limit,
        spend * 100 / limit,
        policy.soft_limit_percent,
        policy.hard_limit_action,
        datetime(2026, 12, 1, tzinfo=UTC),
    )


def _run(costs: list[tuple[float, int]], policy: BudgetPolicy, shift: bool) -> _Run:
    rules = StatusRules(Decimal(1), Decimal(1))
    limit = policy.monthly_limit_usd
    assert limit is not None
    spend = 0
    status = "normal"
    seen = _published(policy, "normal", 0)
    seen_step = 0
    out: list[tuple[float, int]] = []
    cloud = local = rejected = 0
    for index, (moment, cost) in enumerate(costs):
        candidates = [CLOUD, LOCAL] if shift else [CLOUD]
        if not shift and seen.status == "hard_limit":
            candidates = [CLOUD, LOCAL]  # without the shift, local only once the cap is hit
        decision = decide(f"req-{index}", [seen], candidates)
        if decision.rejection is not None:
            rejected += 1
            continue
        if decision.candidates[0].backend == "cloud":
            spend += cost
            cloud += 1
            out.append((moment, spend))
        else:
            local += 1
        status = rules.next_status(status, spend, policy)  # type: ignore[arg-type]
        step = rules.step_of(spend, limit) or 0
        if step != seen_step or status != seen.status:
            # The aggregate publishes on each step and on each change of status.
            seen_step = step
            seen = _published(policy, status, spend)
    return _Run(out, cloud, local, rejected)


def simulate_shift(requests: int = 200_000, seed: int = 1, overspend: float = 1.6) -> ShiftResult:
    """``requests`` spread over a month whose cloud cost would be ``overspend`` × the limit."""
    rng = random.Random(seed)
    limit = 1_000 * 10**12  # $1,000
    mean = int(limit * overspend / requests)
    costs = sorted((rng.uniform(0, MONTH_S), max(1, int(rng.expovariate(1 / mean)))) for _ in range(requests))
    policy = BudgetPolicy.model_validate(
        {"id": "team:a", "monthly_limit_usd": "1000", "soft_limit_percent": 75, "hard_limit_action": "block_cloud"}
    )
    without = _run(costs, policy, shift=False)
    with_shift = _run(costs, policy, shift=True)
    start = without.first_time_at(limit * 80 // 100)
    end = without.first_time_at(limit)
    if start is None or end is None:
        raise ValueError("the traffic must push the unshifted run past its limit: raise overspend")
    return ShiftResult(
        requests=requests,
        limit_pico=limit,
        band_start_s=start,
        band_end_s=end,
        without_band_spend=without.spend_between(start, end),
        with_band_spend=with_shift.spend_between(start, end),
        without_total=without.cloud_spend[-1][1],
        with_total=with_shift.cloud_spend[-1][1],
        without_cloud_requests=without.cloud_requests,
        with_cloud_requests=with_shift.cloud_requests,
    )
