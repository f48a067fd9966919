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
