"""Prices that change mid-month: each request is priced by the entry in force at its occurred_at, and the
override file is reloaded by the running enrich worker without a restart."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.timeout(300)

CHANGE = """
  - match: "test-small"
    provider: testco
    input_usd_per_mtok: "0.4"
    output_usd_per_mtok: "1.6"
    valid_from: "{at}"
    source: "the new price, from {at}"
"""


async def test_a_price_change_prices_requests_by_their_time_and_a_reload_needs_no_restart(
    pipeline_factory: Any, kit: Any
) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
    pipeline, _ = await kit.start(
        pipeline_factory,
        n=10,
        speed=1.0,
        start=start + timedelta(hours=6),
        extra_env={"BUDGETFLOW_PRICING__RELOAD_S": "0.5"},
    )
    prices = pipeline.root / "prices.yaml"
    change_at = start + timedelta(hours=3)
    prices.write_text(kit.TEST_PRICES + CHANGE.format(at=change_at.isoformat().replace("+00:00", "Z")))
    enrich = pipeline.start("enrich")
    pipeline.start("aggregate")

    def usage(i: int, at: datetime) -> tuple[str, bytes, bytes]:
        event = {
            "v": 1,
            "request_id": f"p-{i}",
            "request_occurred_at": at.isoformat(),
            "occurred_at": at.isoformat(),
            "budgets": ["team:b"],
            "model": "test-small",
            "provider": "testco",
            "backend": "cloud",
            "outcome": "completed",
            "input_tokens": 1000 + i,
            "output_tokens": 100,
        }
        return pipeline.topics.usage.name, event["request_id"].encode(), orjson.dumps(event)

    # Six hours of calls, one every ten minutes: the first half at the old price, the rest at the new one.
    times = [start + timedelta(minutes=10 * i) for i in range(36)]
    await pipeline.produce([usage(i, at) for i, at in enumerate(times)])
    # The expectation, from TEST_PRICES and CHANGE written out again (pico-dollars per token).
    by_period: dict[str, int] = {}
    for i, at in enumerate(times):
        old = at < change_at
        cost = (1000 + i) * (1_000_001 if old else 400_000) + 100 * (2_500_000 if old else 1_600_000)
        by_period[at.strftime("%Y-%m")] = by_period.get(at.strftime("%Y-%m"), 0) + cost

    async def settled() -> dict[str, int]:
        states = await pipeline.period_states()
        return {p: s.settled for (b, p), s in states.items() if b == "team:b"}

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and await settled() != by_period:
        await asyncio.sleep(0.5)
    assert await settled() == by_period, pipeline.logs()

    # A new price for everything from now on, written while enrich runs: it reloads, and prices what comes next.
    later = datetime.now(UTC).replace(microsecond=0)
    prices.write_text(prices.read_text() + CHANGE.replace('"0.4"', '"0.2"').format(at=later.isoformat()))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "prices reloaded" not in enrich.log.read_text():
        await asyncio.sleep(0.2)
    assert "prices reloaded" in enrich.log.read_text(), enrich.tail()
    assert enrich.alive
    now = datetime.now(UTC)
    await pipeline.produce([usage(100, now)])
    by_period[now.strftime("%Y-%m")] = by_period.get(now.strftime("%Y-%m"), 0) + 1100 * 200_000 + 100 * 1_600_000
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and await settled() != by_period:
        await asyncio.sleep(0.5)
    assert await settled() == by_period
    # A broken file is refused with one line, and the prices in force stay.
    prices.write_text("models: [oops")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "not reloaded" not in enrich.log.read_text():
        await asyncio.sleep(0.2)
    assert "price file not reloaded, the old prices stay" in enrich.log.read_text()
    assert enrich.alive
