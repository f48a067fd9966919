"""The aggregate role: a worker wired to its stats API and its gauges, run until stopped (``budgetflow worker
--role aggregate``).

The worker knows neither the stats API nor the collector (they read the worker); they are wired here.
"""

from __future__ import annotations

import asyncio

from budgetflow.schemas.settings import Settings
from budgetflow.streams.aggregate.metrics import AggregateCollector
from budgetflow.streams.aggregate.stats import stats_app
from budgetflow.streams.aggregate.worker import AggregateWorker
from budgetflow.streams.kafka.topics import Topics
from budgetflow.streams.rules.clock import Clock

__all__ = ["aggregate_worker", "run"]


def aggregate_worker(settings: Settings) -> AggregateWorker:
    """An aggregate worker that serves the stats API on ``WEB__PORT`` and exports its per-budget gauges."""
    worker = AggregateWorker(
        settings, Topics.from_settings(settings), Clock(settings.clock), web_app=lambda view: stats_app(worker, view)
    )
    worker.metrics.registry.register(AggregateCollector(worker, settings.metrics.max_budgets))
    return worker


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """The aggregate role, run until ``stop``."""
    await aggregate_worker(settings).run(stop)
