"""Budget scopes and hierarchy on the real pipeline: a model-scoped budget, a metadata-scoped one, and a
team -> org roll-up are charged exactly without any gateway naming them; unknown budget ids follow
UNKNOWN_BUDGET."""

from __future__ import annotations

import asyncio
import time
import zlib
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.timeout(400)

SCOPED = """
budgets:
  - id: "team:a"
    monthly_limit_usd: "0.50"
    soft_limit_percent: 50
    hard_limit_action: block_cloud
    parent: "org:eng"
  - id: "team:b"
    monthly_limit_usd: "2.00"
    parent: "org:eng"
  - id: "org:eng"
    monthly_limit_usd: "4.00"
  - id: "models:large"
    monthly_limit_usd: "3.00"
    applies_to: {model: "TEST-LARGE*"}
  - id: "proj:apollo"
    applies_to: {metadata: {project: "apollo*"}, backend: cloud}
    parent: "org:research"
  - id: "org:research"
"""


def derived(event: dict[str, Any]) -> list[str]:
    """The budgets the policies above imply, computed here without budgetflow's resolver."""
    budgets = list(event["budgets"])
    if event["model"].startswith("test-large"):
        budgets.append("models:large")
    if event.get("metadata", {}).get("project", "").startswith("apollo") and event["backend"] == "cloud":
        budgets += ["proj:apollo", "org:research"]
    if {"team:a", "team:b"} & set(budgets):
        budgets.append("org:eng")
    return list(dict.fromkeys(budgets))


async def test_scoped_and_parent_budgets_are_charged_without_the_gateway_naming_them(
    pipeline_factory: Any, kit: Any
) -> None:
    pipeline, scenario = await kit.start(pipeline_factory)
    scoped = pipeline.root / "scoped.yaml"
    scoped.write_text(SCOPED)
    proc = pipeline.cli("policy", "apply", str(scoped))
    assert proc.returncode == 0, proc.stderr
    records, events = [], []
    for topic, key, value in scenario.records:
        event = orjson.loads(value)
        if zlib.crc32(event["request_id"].encode()) % 3 == 0:  # about a third of the requests are project apollo
            event["metadata"] = {"project": "apollo-2"}
        records.append((topic, key, orjson.dumps(event)))
        kind = "requests" if topic == pipeline.topics.requests.name else "usage"
        events.append((kind, {**event, "budgets": derived(event)}))
    expected = kit.expected_of(events)
    assert {b for b, _ in expected.settled} >= {"org:eng", "models:large", "proj:apollo", "org:research"}
    pipeline.start("enrich")
    pipeline.start("aggregate")
    await pipeline.produce(records)
    expected.records = records
    states = await kit.settle(pipeline, expected)
    kit.check_counts(states, expected)


async def test_unknown_budget_ids_follow_the_setting(pipeline_factory: Any, kit: Any) -> None:
    pipeline, _ = await kit.start(
        pipeline_factory, n=10, speed=1.0, start=datetime.now(UTC), extra_env={"BUDGETFLOW_UNKNOWN_BUDGET": "dlq"}
    )
    now = datetime.now(UTC).isoformat()

    def usage(request_id: str, budgets: list[str]) -> tuple[str, bytes, bytes]:
        event = {
            "v": 1,
            "request_id": request_id,
            "request_occurred_at": now,
            "occurred_at": now,
            "budgets": budgets,
            "model": "test-small",
            "provider": "testco",
            "backend": "cloud",
            "outcome": "completed",
            "input_tokens": 10,
            "output_tokens": 1,
        }
        return pipeline.topics.usage.name, request_id.encode(), orjson.dumps(event)

    pipeline.start("enrich")
    pipeline.start("aggregate")
    await pipeline.produce([usage("known", ["team:a"]), usage("unknown", ["team:a", "nobody:here"])])
    period = now[:7]
    deadline = time.monotonic() + 60
    dead: list[Any] = []
    while time.monotonic() < deadline:
        dead = await pipeline.records(pipeline.topics.dlq.name)
        states = await pipeline.period_states()
        if dead and ("team:a", period) in states:
            break
        await asyncio.sleep(0.5)
    assert [k for _, k, _, _ in dead] == [b"unknown"]
    assert states[("team:a", period)].requests == 1  # the known one; the other lost nothing, it is in the DLQ
    assert ("nobody:here", period) not in states
