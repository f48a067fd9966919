"""The stats API answers for every budget whichever aggregate worker is asked."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from budgetflow.schemas.money import usd_string

pytestmark = pytest.mark.timeout(300)


async def test_stats_api_is_right_on_either_worker(pipeline_factory: Any, kit: Any) -> None:
    from budgetflow.streams.readback import read_heartbeats

    pipeline, scenario = await kit.start(pipeline_factory, n=400)
    pipeline.start("enrich")
    pipeline.start("aggregate", data="agg-a")
    pipeline.start("aggregate", data="agg-b")
    await pipeline.produce(scenario.records)
    await kit.settle(pipeline, scenario)
    deadline = time.monotonic() + 60
    owners: set[str] = set()
    while time.monotonic() < deadline:
        beats = await read_heartbeats(pipeline.settings(), pipeline.topics.heartbeats.name)
        owners = {b.owner for b in beats.values() if b.owner and b.as_of.timestamp() > time.time() - 120}
        if len(owners) == 2:
            break
        await asyncio.sleep(0.5)
    assert len(owners) == 2, f"expected two workers sharing the partitions, saw {owners}"
    async with aiohttp.ClientSession() as http:
        for url in owners:
            async with http.get(f"{url}/healthz") as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["ready"] is True
        for (budget, period), settled in scenario.settled.items():
            answers = []
            for url in sorted(owners):
                async with http.get(f"{url}/v1/budgets/{budget}") as response:
                    assert response.status == 200, await response.text()
                    answers.append(await response.json())
            # The projection moves with the clock between the two calls; everything else is the same.
            moving = ("projected_month_end_usd", "projected_hard_limit_at")
            assert all(key in answers[0] for key in moving)
            same = [{k: v for k, v in a.items() if k not in moving} for a in answers]
            assert same[0] == same[1], "both workers give the same answer"
            month = next(p for p in answers[0]["periods"] if p["period"] == period)
            assert month["settled_usd"] == usd_string(settled)
            assert month["requests"] == scenario.requests[(budget, period)]
        for url in owners:
            async with http.get(f"{url}/v1/budgets") as response:
                listed = {row["budget_id"] for row in (await response.json())["budgets"]}
            assert {b for b, _ in scenario.settled} <= listed
            async with http.get(f"{url}/v1/budgets/nobody:here") as response:
                assert response.status == 404
