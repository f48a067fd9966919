"""The aggregate's gauges: per budget and per partition, computed at scrape time from what the worker holds now
(the rules of these gauges are in :mod:`budgetflow.streams.service.metrics`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from budgetflow.schemas.money import pico_to_float_usd
from budgetflow.schemas.periods import next_month_start
from budgetflow.streams.kafka.topics import partition_for
from budgetflow.streams.rules.status import STATUS_RANK, utilization_percent
from budgetflow.streams.service.metrics import Families

if TYPE_CHECKING:
    from budgetflow.schemas.events import StatusName
    from budgetflow.schemas.policy import BudgetPolicy
    from budgetflow.streams.aggregate.records import PeriodState
    from budgetflow.streams.aggregate.worker import AggregateWorker
    from budgetflow.streams.rules.forecast import Forecast

__all__ = ["AggregateCollector"]


class AggregateCollector(Collector):
    """Per-budget and per-partition gauges of one aggregate worker, computed at scrape time."""

    def __init__(self, worker: AggregateWorker, max_budgets: int) -> None:
        self.worker = worker
        self.max_budgets = max_budgets

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        worker = self.worker
        f = Families()
        budgets = _BudgetGauges(f)
        open_res = f.gauge("reservations_open", "Reservations not yet settled.", ["partition"])
        lag = f.gauge(
            "consumer_lag_records", "Records behind the end of the input, per partition.", ["stage", "partition"]
        )
        age = f.gauge("heartbeat_age_seconds", "Age of each ledger partition's last heartbeat.", ["partition"])
        exported = self._exported_budgets()
        partitions = worker.topics.ledger.partitions
        # A budget with a policy is exported by the worker owning its ledger partition from the moment the
        # policy is read, before any entry: a new budget shows on dashboards (and its limit alerts) from day one.
        owner_of = {budget: partition_for(budget, partitions) for budget in exported}
        now = worker.clock.now()
        for p, ledger in sorted(worker.ledgers.items()):
            open_res.add_metric([str(p)], ledger.open_reservations)
            behind = worker.lag_records(p)
            if behind is not None:
                lag.add_metric(["aggregate", str(p)], behind)
            current = worker.publisher.current_period(ledger)
            for budget in sorted(b for b, owner in owner_of.items() if owner == p):
                policy = worker.policies.policy_for(budget)
                state = ledger.period_state(budget, current)
                budgets.add(
                    budget,
                    state,
                    policy,
                    state.status if state else worker.publisher.rules.next_status("normal", 0, policy),
                    worker.forecasts.forecast(ledger, budget, current),
                    now=now.timestamp(),
                    reset_at=next_month_start(current).timestamp(),
                )
        if worker.view is not None:
            for partition, seconds in worker.view.heartbeat_ages(now).items():
                age.add_metric([str(partition)], seconds)
        yield from f.families.values()

    def _exported_budgets(self) -> list[str]:
        budgets = sorted({"global", *self.worker.policies.budgets()})
        return budgets[: self.max_budgets]


class _BudgetGauges:
    """The per-budget gauges of one scrape."""

    def __init__(self, f: Families) -> None:
        self.spend = f.gauge("budget_spend_usd", "Spend this month (settled + reserved).", ["budget"])
        self.settled = f.gauge("budget_settled_usd", "Settled spend this month.", ["budget"])
        self.reserved = f.gauge("budget_reserved_usd", "Reserved (in flight) spend this month.", ["budget"])
        self.limit = f.gauge("budget_limit_usd", "Monthly limit (absent when unlimited).", ["budget"])
        self.soft = f.gauge("budget_soft_limit_usd", "The soft limit in USD (absent when unlimited).", ["budget"])
        self.util = f.gauge("budget_utilization_percent", "Spend over limit, percent.", ["budget"])
        self.status = f.gauge(
            "budget_status", "0 normal, 1 soft limit, 2 hard limit (owner: the policy's).", ["budget", "owner"]
        )
        self.reset = f.gauge("budget_reset_seconds", "Seconds until the monthly reset.", ["budget"])
        self.projected = f.gauge(
            "budget_projected_spend_usd", "Projected spend at the end of the month.", ["budget", "owner"]
        )
        self.hard_in = f.gauge(
            "budget_projected_hard_limit_seconds",
            "Seconds until the projected hard limit (absent if not this month).",
            ["budget"],
        )
        self.requests = f.gauge("budget_requests", "Requests counted this month.", ["budget"])
        self.leased = f.gauge(
            "budget_leased_usd", "Headroom leased to routers and not yet used by their reserves.", ["budget"]
        )

    def add(
        self,
        budget: str,
        state: PeriodState | None,
        policy: BudgetPolicy,
        status: StatusName,
        forecast: Forecast,
        *,
        now: float,
        reset_at: float,
    ) -> None:
        """One budget's current month (``state`` None: nothing counted yet, ``status`` what zero spend means)."""
        s = state.settled if state else 0
        r = state.reserved if state else 0
        label = [budget]
        owned = [budget, policy.owner or ""]
        self.spend.add_metric(label, pico_to_float_usd(s + r))
        self.settled.add_metric(label, pico_to_float_usd(s))
        self.reserved.add_metric(label, pico_to_float_usd(r))
        self.status.add_metric(owned, STATUS_RANK[status])
        self.requests.add_metric(label, state.requests if state else 0)
        self.leased.add_metric(label, pico_to_float_usd(state.leased if state else 0))
        self.reset.add_metric(label, max(0.0, reset_at - now))
        limit = policy.monthly_limit_usd
        if limit is not None:
            self.limit.add_metric(label, pico_to_float_usd(limit))
            self.soft.add_metric(label, pico_to_float_usd(limit * policy.soft_limit_percent // 100))
            utilization = utilization_percent(s + r, limit)
            if limit and utilization is not None:
                self.util.add_metric(label, utilization)
        self.projected.add_metric(owned, pico_to_float_usd(forecast.month_end_pico))
        if forecast.hard_limit_at is not None:
            self.hard_in.add_metric(label, max(0.0, forecast.hard_limit_at - now))
