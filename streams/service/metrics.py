"""Prometheus metrics, in one module, against an injected registry.

Counters and histograms are updated as records flow; per-budget and
per-partition gauges are computed at scrape time from what the worker holds
right now, so a worker exports only the budgets of the partitions it owns and
only the current period: after a rebalance no series lingers and ``sum()``
does not double. Label sets are bounded: budgets with a policy (and
``global``), capped by ``METRICS__MAX_BUDGETS``; models are named by their
price-table entry, anything else is ``other``. Money becomes a float only
here. No prompt text, message content or API key ever becomes a label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from budgetflow.schemas.money import pico_to_float_usd

if TYPE_CHECKING:
    from budgetflow.streams.aggregate.worker import AggregateWorker
    from budgetflow.streams.gateway.publisher import BudgetPublisher
    from budgetflow.streams.gateway.view import BudgetView

__all__ = [
    "AggregateCollector",
    "LabelLimiter",
    "PipelineMetrics",
    "RouterCollector",
    "exposition",
]

PREFIX = "budgetflow"
COST_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DURATION_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)
PROPAGATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STATUS_VALUE = {"normal": 0, "soft_limit": 1, "hard_limit": 2}


class LabelLimiter:
    """At most ``limit`` distinct values of a label; the rest become ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit:
            return "other"
        self._seen.add(value)
        return value


class PipelineMetrics:
    """The counters and histograms of the workers (each worker registers what it updates)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records = Counter(
            f"{PREFIX}_records", "Records read (in) and written (out) per stage.", ["stage", "direction"], registry=r
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters", "Records sent to the dead-letter topic.", ["stage", "reason"], registry=r
        )
        self.unknown_fields = Counter(
            f"{PREFIX}_unknown_fields", "Unknown fields ignored in events.", ["topic"], registry=r
        )
        self.unpriced = Counter(
            f"{PREFIX}_unpriced_requests", "Calls of models with no price (fallback rates).", ["model"], registry=r
        )
        self.unknown_budgets = Counter(
            f"{PREFIX}_unknown_budgets",
            "Budget ids named by gateways with no policy (UNKNOWN_BUDGET says what became of them).",
            ["budget"],
            registry=r,
        )
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens counted or reported.", ["tier", "model", "kind"], registry=r)
        self.cost = Histogram(
            f"{PREFIX}_cost_per_request_usd",
            "Cost of a finished call in USD.",
            ["model", "backend"],
            buckets=COST_BUCKETS,
            registry=r,
        )
        self.count_duration = Histogram(
            f"{PREFIX}_token_count_duration_seconds",
            "Time to count a request's tokens.",
            ["tier"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ledger_entries = Counter(
            f"{PREFIX}_ledger_entries", "Ledger entries applied, by kind and outcome.", ["kind", "outcome"], registry=r
        )
        self.budget_events = Counter(f"{PREFIX}_budget_events", "Status transitions announced.", ["event"], registry=r)
        self.late = Counter(
            f"{PREFIX}_late_entries",
            "Entries too late to count (closed period or past the horizon).",
            ["reason"],
            registry=r,
        )
        self.expired = Counter(
            f"{PREFIX}_reservations_expired", "Reservations that expired at their estimate.", registry=r
        )
        self.policy_skipped = Counter(
            f"{PREFIX}_policy_records_skipped", "Malformed records on the policies topic that were skipped.", registry=r
        )
        self.statuses = Counter(f"{PREFIX}_statuses_published", "Budget statuses published.", ["reason"], registry=r)
        self.propagation = Histogram(
            f"{PREFIX}_status_propagation_seconds",
            "From a ledger entry reaching the broker to the status it moved being published.",
            buckets=PROPAGATION_BUCKETS,
            registry=r,
        )
        self.models = LabelLimiter(200)
        self.unpriced_models = LabelLimiter(50)
        self.unknown_budget_ids = LabelLimiter(100)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: on a hot path the label lookup costs more than the increment."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def start_counters(self, stage: str) -> None:
        """Counters of a bounded label set start at 0, so that rates and alerts see them before a first event."""
        from budgetflow.schemas.serde import REASONS

        for reason in REASONS:
            self.dead_letters.labels(stage, reason)
        for direction in ("in", "out"):
            self.records.labels(stage, direction)
        if stage == "aggregate":
            self.dead_letters.labels(stage, "late")
            for reason in ("period", "horizon"):
                self.late.labels(reason)
            for event in ("soft_limit", "hard_limit", "normal"):
                self.budget_events.labels(event)
            for reason in ("threshold", "step", "refresh", "rollover", "policy"):
                self.statuses.labels(reason)


class _Families:
    def __init__(self) -> None:
        self.families: dict[str, GaugeMetricFamily] = {}

    def gauge(self, name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        family = self.families.get(name)
        if family is None:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            self.families[name] = family
        return family


class AggregateCollector(Collector):
    """Per-budget and per-partition gauges of one aggregate worker, computed at scrape time."""

    def __init__(self, worker: AggregateWorker, max_budgets: int) -> None:
        self.worker = worker
        self.max_budgets = max_budgets

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        worker = self.worker
        f = _Families()
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
                reset.add_metric(label, max(0.0, worker.period_end(current) - now.timestamp()))
                if policy.monthly_limit_usd is not None:
                    limit.add_metric(label, pico_to_float_usd(policy.monthly_limit_usd))
                    soft.add_metric(
                        label, pico_to_float_usd(policy.monthly_limit_usd * policy.soft_limit_percent // 100)
                    )
                    if policy.monthly_limit_usd:
                        util.add_metric(label, (s + r) * 100 / policy.monthly_limit_usd)
                forecast = worker.forecast(ledger, budget, current)
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


class RouterCollector(Collector):
    """A gateway's view of budgetflow: decisions, staleness, the publisher's buffer and spool."""

    def __init__(
        self,
        view: BudgetView | None = None,
        publisher: BudgetPublisher | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.view = view
        self.publisher = publisher
        self.now = now or (lambda: datetime.now(UTC))

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        if self.view is not None:
            decisions = CounterMetricFamily(
                f"{PREFIX}_router_decisions", "Routing decisions by outcome.", labels=["outcome"]
            )
            for outcome in ("cloud", "local", "rejected"):
                decisions.add_metric([outcome], self.view.decisions.get(outcome, 0))
            yield decisions
            yield GaugeMetricFamily(
                f"{PREFIX}_router_budgets", "Budgets the view knows.", value=len(self.view.budgets())
            )
            now = self.now()
            stale = sum(1 for b in self.view.budgets() if self.view.status(b, now=now).stale)
            yield GaugeMetricFamily(f"{PREFIX}_router_stale_budgets", "Budgets whose status is stale.", value=stale)
            yield GaugeMetricFamily(
                f"{PREFIX}_router_view_ready", "1 once the view has caught up.", value=1 if self.view.is_ready else 0
            )
        if self.publisher is not None:
            events = CounterMetricFamily(
                f"{PREFIX}_publisher_events", "Publisher events by what became of them.", labels=["result"]
            )
            for result, count in sorted(self.publisher.counts.items()):
                events.add_metric([result], count)
            yield events
            yield GaugeMetricFamily(
                f"{PREFIX}_publisher_buffered",
                "Events in the publisher's memory buffer.",
                value=self.publisher.buffered,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_publisher_spool_bytes",
                "Bytes of usage waiting in the spool.",
                value=self.publisher.spool_bytes(),
            )


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition format of a registry (what /metrics serves)."""
    return bytes(generate_latest(registry))
