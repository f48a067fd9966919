"""Metrics against a fresh registry: names, bounded labels, the router's collector."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from budgetflow.schemas.settings import Settings
from budgetflow.streams.gateway.metrics import RouterCollector
from budgetflow.streams.gateway.routing import Candidate
from budgetflow.streams.gateway.view import BudgetView
from budgetflow.streams.service.metrics import LabelLimiter, PipelineMetrics, exposition


def test_label_limiter_bounds_a_label() -> None:
    limit = LabelLimiter(2)
    assert [limit("a"), limit("b"), limit("c"), limit("a")] == ["a", "b", "other", "a"]


def test_pipeline_metrics_use_one_prefix_and_units() -> None:
    metrics = PipelineMetrics(CollectorRegistry())
    metrics.cost.labels("gpt-4o", "cloud").observe(0.0123)
    metrics.dead_letters.labels("enrich", "json").inc()
    text = exposition(metrics.registry).decode()
    assert 'budgetflow_cost_per_request_usd_bucket{backend="cloud",le="0.03",model="gpt-4o"} 1.0' in text
    assert 'budgetflow_dead_letters_total{reason="json",stage="enrich"} 1.0' in text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert all(name.startswith("budgetflow_") for name in names)


def test_router_collector_reports_decisions_and_staleness() -> None:
    view = BudgetView(Settings())
    view.decide("r", ["team:a"], [Candidate("gpt-4o", "cloud")], now=datetime(2026, 11, 1, tzinfo=UTC))
    registry = CollectorRegistry()
    registry.register(RouterCollector(view))
    text = exposition(registry).decode()
    assert 'budgetflow_router_decisions_total{outcome="cloud"} 1.0' in text
    assert "budgetflow_router_view_ready 0.0" in text


def test_a_budget_with_a_policy_is_exported_before_any_entry_by_its_owner_only_and_bounded() -> None:
    from types import SimpleNamespace
    from typing import Any

    from prometheus_client.parser import text_string_to_metric_families

    from budgetflow.schemas.policy import BudgetPolicy
    from budgetflow.schemas.settings import TopicSettings
    from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
    from budgetflow.streams.aggregate.metrics import AggregateCollector
    from budgetflow.streams.aggregate.statuses import StatusPublisher
    from budgetflow.streams.aggregate.store import MemoryStore
    from budgetflow.streams.kafka.topics import Topics, partition_for
    from budgetflow.streams.rules.forecast import Forecast
    from budgetflow.streams.rules.status import StatusRules

    now = datetime(2026, 11, 10, tzinfo=UTC)
    topics = Topics(TopicSettings(partitions=4))
    policies = {
        f"team:{i}": BudgetPolicy(id=f"team:{i}", monthly_limit_usd=f"{i + 1}.50", soft_limit_percent=80)  # type: ignore[arg-type]
        for i in range(12)
    }
    policies["team:zero"] = BudgetPolicy(id="team:zero", monthly_limit_usd="0")  # type: ignore[arg-type]

    def policy_for(budget: str) -> BudgetPolicy:
        return policies.get(budget) or BudgetPolicy(id=budget)

    def worker(partitions: list[int]) -> Any:
        return SimpleNamespace(
            topics=topics,
            ledgers={p: PartitionLedger(p, MemoryStore(), LedgerConfig(), policy_for) for p in partitions},
            policies=SimpleNamespace(budgets=lambda: list(policies), policy_for=policy_for),
            publisher=StatusPublisher(StatusRules(), policy_for, lambda: now, refresh_s=60),
            forecasts=SimpleNamespace(forecast=lambda *_: Forecast(0.0, 0, None)),
            clock=SimpleNamespace(now=lambda: now),
            lag_records=lambda _: None,
            view=None,
        )

    def scrape(partitions: list[int], max_budgets: int) -> dict[str, dict[str, float]]:
        registry = CollectorRegistry()
        registry.register(AggregateCollector(worker(partitions), max_budgets))
        out: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(exposition(registry).decode()):
            for sample in family.samples:
                if "budget" in sample.labels:
                    out.setdefault(sample.labels["budget"], {})[sample.name] = sample.value
        return out

    first, second = scrape([0, 1], 100), scrape([2, 3], 100)
    assert not first.keys() & second.keys(), "one series per budget, from its owner only"
    assert first.keys() | second.keys() == {*policies, "global"}
    for budget, gauges in {**first, **second}.items():
        assert partition_for(budget, 4) in ([0, 1] if budget in first else [2, 3])
        assert gauges["budgetflow_budget_spend_usd"] == 0.0
    team_3 = {**first, **second}["team:3"]
    assert team_3["budgetflow_budget_limit_usd"] == 4.5
    assert team_3["budgetflow_budget_soft_limit_usd"] == 3.6
    assert team_3["budgetflow_budget_status"] == 0.0
    assert {**first, **second}["team:zero"]["budgetflow_budget_status"] == 2.0  # a $0 limit is hard at zero spend
    bounded = scrape([0, 1, 2, 3], 5)
    assert len(bounded) == 5
