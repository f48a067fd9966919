"""Each budget's month-end forecast on an aggregate worker: sampled on stream time, read when a status is built.

The statuses, the gauges and the stats API all read :meth:`BudgetForecasts.forecast`; the worker samples a
partition after each tick (:mod:`budgetflow.streams.rules.forecast` has the burn-rate rule).
"""

from __future__ import annotations

from collections.abc import Callable

from budgetflow.schemas.events import SHARD_MARK
from budgetflow.schemas.periods import month_start, next_month_start
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.settings import ForecastSettings
from budgetflow.streams.aggregate.ledger import PartitionLedger
from budgetflow.streams.rules.clock import Clock
from budgetflow.streams.rules.forecast import Forecast, Forecaster

__all__ = ["BudgetForecasts"]


class BudgetForecasts:
    """The forecaster of one worker's budgets, fed each partition's spend once per ``sample_s`` of stream time."""

    def __init__(self, settings: ForecastSettings, clock: Clock, policy_for: Callable[[str], BudgetPolicy]) -> None:
        self.forecaster = Forecaster(settings.window_s)
        self.sample_s = settings.sample_s
        self.clock = clock
        self.policy_for = policy_for
        self._sampled_at: dict[int, float] = {}

    def sample(self, ledger: PartitionLedger, current: str) -> None:
        """Feed the forecaster each ``current``-period budget's spend, once per sample interval of stream time."""
        t = ledger.meta.stream_time
        if t - self._sampled_at.get(ledger.partition, 0.0) < self.sample_s:
            return
        self._sampled_at[ledger.partition] = t
        start = month_start(current).timestamp()
        for (budget, period), state in ledger.periods.items():
            if period == current and SHARD_MARK not in budget:
                self.forecaster.sample((budget, period), t, state.spend, start)

    def forecast(self, ledger: PartitionLedger, budget: str, period: str) -> Forecast:
        """Where the budget's month will end, on this partition's stream time (or the clock, if later)."""
        state = ledger.period_state(budget, period)
        spend = state.spend if state is not None else 0
        limit = self.policy_for(budget).monthly_limit_usd
        now = max(ledger.meta.stream_time, self.clock.now().timestamp())
        return self.forecaster.forecast(
            (budget, period), now, spend, limit, month_start(period).timestamp(), next_month_start(period).timestamp()
        )
