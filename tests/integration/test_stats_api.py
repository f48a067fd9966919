"""The stats API answers for every budget whichever aggregate worker is asked, whenever it is asked."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from budgetflow.schemas.money import usd_string

pytestmark = pytest.mark.timeout(300)

TOKEN = "stats-api-token-51c0"  # a test's own tokens
PEER_TOKEN = "stats-peer-token-0b7e"
MOVING = ("projected_month_end_usd", "projected_hard_limit_at")  # they move with the clock between two calls


def expected_status(budget: str, spend: int, kit: Any) -> str:
    limit = kit.LIMITS[budget]
    if spend * 100 >= limit * 100:
        return "hard_limit"
    return "soft_limit" if spend * 100 >= limit * kit.SOFT.get(budget, 75) else "normal"


async def test_stats_api_is_right_on_either_worker(pipeline_factory: Any, kit: Any) -> None:
    """Two workers, each asked about every budget: the same, exact answers, forwarded between configured peers
    with their own token, and the same again a moment later (the answer does not depend on when it is asked)."""
    from budgetflow.streams.dev.localkafka import free_port
    from budgetflow.streams.ops.readback import read_heartbeats

    ports = [free_port(), free_port()]
    peers = [f"http://127.0.0.1:{port}" for port in ports]
    env = {
        "BUDGETFLOW_WEB__BEARER_TOKEN": TOKEN,
        "BUDGETFLOW_WEB__PEER_TOKEN": PEER_TOKEN,
        "BUDGETFLOW_WEB__PEERS": "[" + ", ".join(f'"{p}"' for p in peers) + "]",
    }
    pipeline, scenario = await kit.start(pipeline_factory, n=400, extra_env=env)
    pipeline.start("enrich")
    for port, data in zip(ports, ("agg-a", "agg-b"), strict=True):
        pipeline.env_base["BUDGETFLOW_WEB__PORT"] = str(port)
        pipeline.start("aggregate", data=data)
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
    assert owners == set(peers), f"expected two workers sharing the partitions, saw {owners}"
    current = max(period for _, period in scenario.settled)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as http:

        async def ask(url: str, path: str) -> Any:
            async with http.get(f"{url}{path}") as response:
                assert response.status == 200, await response.text()
                return await response.json()

        for url in owners:
            assert (await ask(url, "/healthz"))["ready"] is True
        first: dict[str, dict[str, Any]] = {}
        for (budget, period), settled in scenario.settled.items():
            answers = [await ask(url, f"/v1/budgets/{budget}") for url in sorted(owners)]
            assert all(key in answers[0] for key in MOVING)
            same = [{k: v for k, v in a.items() if k not in MOVING} for a in answers]
            assert same[0] == same[1], "both workers give the same answer"
            first[budget] = same[0]
            month = next(p for p in answers[0]["periods"] if p["period"] == period)
            assert month["settled_usd"] == usd_string(settled)
            assert month["requests"] == scenario.requests[(budget, period)]
            if period == current:
                # The status fields are the budget's exact state, not a router's treatment of it.
                spend = scenario.settled[(budget, current)]
                limit = kit.LIMITS[budget]
                assert answers[0]["spend_usd"] == usd_string(spend)
                assert answers[0]["utilization_percent"] == spend * 100 / limit
                assert answers[0]["status"] == expected_status(budget, spend, kit)
                assert answers[0]["stale"] is False
        # Asked again over two seconds (ten heartbeats, four simulated hours at this clock's speed).
        until = time.monotonic() + 2
        while time.monotonic() < until:
            for budget, answer in first.items():
                for url in sorted(owners):
                    again = {k: v for k, v in (await ask(url, f"/v1/budgets/{budget}")).items() if k not in MOVING}
                    assert again == answer, f"{budget} from {url} changed while nothing happened"
        # The lists are the last published statuses (whether stale depends on when the heartbeats last came):
        # once the last refresh has reached both workers' views, the same on both, and what the owners said.
        deadline = time.monotonic() + 30
        while True:
            lists = []
            for url in sorted(owners):
                rows = {row["budget_id"]: row for row in (await ask(url, "/v1/budgets"))["budgets"]}
                lists.append({b: {k: v for k, v in r.items() if k != "stale"} for b, r in rows.items()})
            owned = {b: {k: v for k, v in first[b].items() if k in lists[0].get(b, {}) and k != "stale"} for b in first}
            if lists[0] == lists[1] and all(lists[0].get(b) == answer for b, answer in owned.items()):
                break
            assert time.monotonic() < deadline, f"the lists never settled: {lists} against {owned}"
            await asyncio.sleep(0.5)
        for url in owners:
            async with http.get(f"{url}/v1/budgets/nobody:here") as response:
                assert response.status == 404
