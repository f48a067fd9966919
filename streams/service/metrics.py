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

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

__all__ = ["PREFIX", "Families", "LabelLimiter", "PipelineMetrics", "exposition"]

PREFIX = "budgetflow"
COST_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DURATION_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)
PROPAGATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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

    # Every metric family of the workers, one after another: a table, longer than a function should be, read whole.
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


class Families:
    """Gauge families built at scrape time, one per name."""

    def __init__(self) -> None:
        self.families: dict[str, GaugeMetricFamily] = {}

    def gauge(self, name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        family = self.families.get(name)
        if family is None:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            self.families[name] = family
        return family


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition format of a registry (what /metrics serves)."""
    return bytes(generate_latest(registry))
