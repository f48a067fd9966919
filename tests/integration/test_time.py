"""Time rules on the real pipeline: a month boundary crossed with events out of order and the aggregate
down over midnight; events from the future and from a closed month go to the DLQ, never into a month."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.timeout(400)


async def test_month_boundary_out_of_order_with_the_aggregate_down_over_midnight(
    pipeline_factory: Any, kit: Any
) -> None:
    pipeline, scenario = await kit.start(pipeline_factory, n=900)
    pipeline.start("enrich")
    aggregate = pipeline.start("aggregate")
    began = time.monotonic()
    first, rest = scenario.records[:300], scenario.records[300:]
    await pipeline.produce(first)
    await asyncio.sleep(1.0)
    aggregate.kill()  # simulated 21:00 or so: down before midnight
    rng = random.Random(5)
    rng.shuffle(rest)  # both months, in no order at all
    topics = pipeline.topics
    usage = {
        "v": 1,
        "outcome": "completed",
        "model": "test-small",
        "provider": "testco",
        "backend": "cloud",
        "budgets": ["team:a"],
        "input_tokens": 10,
        "output_tokens": 10,
    }
    future = [
        (
            topics.usage.name,
            f"f{i}".encode(),
            orjson.dumps(
                {
                    **usage,
                    "request_id": f"future-{i}",
                    "request_occurred_at": (kit.START + timedelta(days=20)).isoformat(),
                    "occurred_at": (kit.START + timedelta(days=20)).isoformat(),
                }
            ),
        )
        for i in range(7)
    ]
    closed = [
        (
            topics.usage.name,
            f"c{i}".encode(),
            orjson.dumps(
                {
                    **usage,
                    "request_id": f"closed-{i}",
                    "request_occurred_at": (kit.START - timedelta(days=40)).isoformat(),
                    "occurred_at": (kit.START - timedelta(days=40)).isoformat(),
                }
            ),
        )
        for i in range(3)
    ]
    await pipeline.produce(rest + future)
    # Midnight passes (four simulated hours in) with no aggregate running; it comes back at about 06:00.
    while time.monotonic() - began < 10:
        await asyncio.sleep(0.5)
    pipeline.start("aggregate")
    states = await kit.settle(pipeline, scenario)
    kit.check_counts(states, scenario)
    await pipeline.produce(closed)
    deadline = time.monotonic() + 60
    reasons: dict[str, int] = {}
    while time.monotonic() < deadline:
        reasons = {}
        for headers, _, _ in await pipeline.dead_letters():
            reason = headers["budgetflow.reason"].decode()
            reasons[reason] = reasons.get(reason, 0) + 1
        if reasons.get("future") == 7 and reasons.get("late") == 6:
            break
        await asyncio.sleep(1)
    assert reasons == {"future": 7, "late": 6}, reasons  # closed: team:a and global each
    # Nothing was counted in a month it does not belong to.
    assert {k: s.settled for k, s in (await pipeline.period_states()).items()} == scenario.settled
    # Rolled over although the worker was down at midnight: every budget's last status is December's.
    latest: dict[str, dict[str, Any]] = {}
    for _, key, value, _ in await pipeline.records(topics.status.name):
        if value is not None:
            latest[key.decode()] = orjson.loads(value)
    assert {s["period"] for s in latest.values()} == {"2026-12"}
    assert latest["nov:only"]["status"] == "normal"
