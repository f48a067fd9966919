"""A budget's gauges exist from the moment its policy is applied, before any traffic, and from its owner only."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from integration.test_observability import wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(300)

BUDGET = "team:fresh"
POLICY = f"""
budgets:
  - id: "{BUDGET}"
    monthly_limit_usd: "12.50"
    soft_limit_percent: 80
"""


def budget_samples(text: str, budget: str) -> dict[str, float]:
    """The budget's gauges in one scrape: metric name → value."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("budget") == budget
    }


async def test_a_new_budget_is_exported_by_its_owner_before_any_traffic(pipeline_factory: Any, kit: Any) -> None:
    from budgetflow.streams.dev.localkafka import free_port
    from budgetflow.streams.kafka.topics import partition_for

    pipeline = pipeline_factory(clock_start=kit.START.isoformat(), speed=1.0)
    assert pipeline.cli("topics", "create").returncode == 0
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    for port, data in zip(ports, ("agg-a", "agg-b"), strict=True):
        pipeline.env_base["BUDGETFLOW_WEB__PORT"] = str(port)
        pipeline.start("aggregate", data=data)
    partitions = pipeline.topics.ledger.partitions
    policy = pipeline.root / "policy.yaml"
    policy.write_text(POLICY)
    applied = pipeline.cli("policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr
    owner_partition = partition_for(BUDGET, partitions)

    async with aiohttp.ClientSession() as http:

        async def settled() -> dict[str, tuple[list[int], dict[str, float]]] | None:
            """Per worker: its partitions and the budget's gauges, once both are ready and split the partitions."""
            seen = {}
            for url in urls:
                try:
                    async with http.get(f"{url}/healthz") as response:
                        health = await response.json()
                    async with http.get(f"{url}/metrics") as response:
                        text = await response.text()
                except aiohttp.ClientError:
                    return None  # not listening yet
                if not health.get("ready"):
                    return None
                seen[url] = (health["partitions"], budget_samples(text, BUDGET))
            held = sorted(p for parts, _ in seen.values() for p in parts)
            if held != list(range(partitions)) or not all(parts for parts, _ in seen.values()):
                return None
            exporting = [url for url, (_, gauges) in seen.items() if "budgetflow_budget_limit_usd" in gauges]
            return seen if exporting else None

        try:
            seen = await wait_until(settled, 120, f"a worker to export {BUDGET}'s gauges with no traffic")
        except AssertionError:
            raise AssertionError(f"no worker exported {BUDGET} with no traffic\n{pipeline.logs()}") from None

    exporters = {url: gauges for url, (_, gauges) in seen.items() if gauges}
    assert len(exporters) == 1, f"exactly one worker exports {BUDGET}: {sorted(exporters)}"
    ((url, gauges),) = exporters.items()
    assert owner_partition in seen[url][0], "the exporter owns the budget's ledger partition"
    assert gauges["budgetflow_budget_limit_usd"] == 12.5
    assert gauges["budgetflow_budget_soft_limit_usd"] == 10.0
    assert gauges["budgetflow_budget_spend_usd"] == 0.0
    assert gauges["budgetflow_budget_status"] == 0.0  # normal
    assert gauges["budgetflow_budget_requests"] == 0.0
