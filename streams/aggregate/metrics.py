"""The aggregate's gauges: per budget and per partition, computed at scrape time from what the worker holds now
(the rules of these gauges are in :mod:`budgetflow.streams.service.metrics`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from budgetflow.schemas.money import pico_to_float_usd
from budgetflow.schemas.periods import next_month_start
from budgetflow.streams.service.metrics import STATUS_VALUE, Families

if TYPE_CHECKING:
    from budgetflow.streams.aggregate.worker import AggregateWorker

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
        spend = f.gauge("budget_spend_usd", "Spend this month (settled + reserved).", ["budget"])
        settled = f.gauge("budget_settled_usd", "Settled spend this month.", ["budget"])
        reserved = f.gauge("budget_reserved_usd", "Reserved (in flight) spend this month.", ["budget"])
        limit = f.gauge("budget_limit_usd", "Monthly limit (absent when unlimited).", ["budget"])
        soft = f.gauge("budget_soft_limit_usd", "The soft limit in USD (absent when unlimited).", ["budget"])
        util = f.gauge("budget_utilization_percent", "Spend over limit, percent.", ["budget"])
        status = f.gauge(
            "budget_status", "0 normal, 1 soft limit, 2 hard limit (owner: the policy's).", ["budget", "owner"]
        )
        reset = f.gauge("budget_reset_seconds", "Seconds until the monthly reset.", ["budget"])
        projected = f.gauge(
            "budget_projected_spend_usd", "Projected spend at the end of the month.", ["budget", "owner"]
        )
        hard_in = f.gauge(
            "budget_projected_hard_limit_seconds",
            "Seconds until the projected hard limit (absent if not this month).",
            ["budget"],
        )
        requests = f.gauge("budget_requests", "Requests counted this month.", ["budget"])
        open_res = f.gauge("reservations_open", "Reservations not yet settled.", ["partition"])
        lag = f.gauge(
            "consumer_lag_records", "Records behind the end of the input, per partition.", ["stage", "partition"]
        )
        age = f.gauge("heartbeat_age_seconds", "Age of each ledger partition's last heartbeat.", ["partition"])
        exported = set(self._exported_budgets())
        now = worker.clock.now()
        for p, ledger in sorted(worker.ledgers.items()):
            open_res.add_metric([str(p)], ledger.open_reservations)
            behind = worker.lag_records(p)
            if behind is not None:
                lag.add_metric(["aggregate", str(p)], behind)
            current = worker.publisher.current_period(ledger)
            for budget in sorted(set(ledger.budgets()) & exported):
                state = ledger.period_state(budget, current)
                policy = worker.policies.policy_for(budget)
                s = state.settled if state else 0
                r = state.reserved if state else 0
                label = [budget]
                owned = [budget, policy.owner or ""]
                spend.add_metric(label, pico_to_float_usd(s + r))
                settled.add_metric(label, pico_to_float_usd(s))
                reserved.add_metric(label, pico_to_float_usd(r))
                status.add_metric(owned, STATUS_VALUE[state.status if state else "normal"])
                requests.add_metric(label, state.requests if state else 0)
                reset.add_metric(label, max(0.0, next_month_start(current).timestamp() - now.timestamp()))
                if policy.monthly_limit_usd is not None:
                    limit.add_metric(label, pico_to_float_usd(policy.monthly_limit_usd))
                    soft.add_metric(
                        label, pico_to_float_usd(policy.monthly_limit_usd * policy.soft_limit_percent // 100)
                    )
                    if policy.monthly_limit_usd:
                        util.add_metric(label, (s + r) * 100 / policy.monthly_limit_usd)
                forecast = worker.forecasts.forecast(ledger, budget, current)
                projected.add_metric(owned, pico_to_float_usd(forecast.month_end_pico))
                if forecast.hard_limit_at is not None:
                    hard_in.add_metric(label, max(0.0, forecast.hard_limit_at - now.timestamp()))
        if worker.view is not None:
            for partition, seconds in worker.view.heartbeat_ages(now).items():
                age.add_metric([str(partition)], seconds)
        yield from f.families.values()

    def _exported_budgets(self) -> list[str]:
        budgets = sorted({"global", *self.worker.policies.budgets()})
        return budgets[: self.max_budgets]
