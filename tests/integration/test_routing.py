"""Routers on the real pipeline: statuses reach a BudgetView in another process and decide follows them."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.timeout(300)

POLICIES = """
budgets:
  - id: global
  - {id: "r:normal", monthly_limit_usd: "1.00"}
  - {id: "r:80", monthly_limit_usd: "1.00"}
  - {id: "r:90", monthly_limit_usd: "1.00"}
  - {id: "r:99", monthly_limit_usd: "1.00"}
  - {id: "r:hard-warn", monthly_limit_usd: "1.00", hard_limit_action: warn}
  - {id: "r:hard-cloud", monthly_limit_usd: "1.00", hard_limit_action: block_cloud}
  - {id: "r:hard-all", monthly_limit_usd: "1.00", hard_limit_action: block_all}
"""
# test-small's output rate is $2.50 per million tokens: 4,000 output tokens per cent.
TARGET = {
    "r:normal": 10,
    "r:80": 80,
    "r:90": 90,
    "r:99": 99,
    "r:hard-warn": 100,
    "r:hard-cloud": 100,
    "r:hard-all": 100,
}


def usage(budget: str, percent: int, now: datetime) -> tuple[str, bytes, bytes]:
    event = {
        "v": 1,
        "request_id": f"fill-{budget}",
        "request_occurred_at": now.isoformat(),
        "occurred_at": now.isoformat(),
        "budgets": [budget],
        "model": "test-small",
        "provider": "testco",
        "backend": "cloud",
        "outcome": "completed",
        "input_tokens": 0,
        "output_tokens": 4_000 * percent,
    }
    return ("usage", event["request_id"].encode(), orjson.dumps(event))


async def wait_for(predicate: Any, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_decide_follows_statuses_from_the_pipeline(pipeline_factory: Any) -> None:
    from budgetflow.schemas.events import BudgetStatus
    from budgetflow.schemas.serde import dumps
    from budgetflow.streams import BudgetView, Candidate

    now = datetime.now(UTC)
    pipeline = pipeline_factory(
        clock_start=now.isoformat(),
        speed=1.0,
        extra_env={"BUDGETFLOW_VIEW__STALE_AFTER_S": "3", "BUDGETFLOW_VIEW__EXPIRE_AFTER_S": "8"},
    )
    (pipeline.root / "policies.yaml").write_text(POLICIES)
    assert pipeline.cli("policy", "apply", str(pipeline.root / "policies.yaml")).returncode == 0
    pipeline.start("enrich")
    aggregate = pipeline.start("aggregate")
    topics = pipeline.topics
    await pipeline.produce([(topics.usage.name, k, v) for _, k, v in (usage(b, p, now) for b, p in TARGET.items())])

    async with BudgetView(pipeline.settings()) as view:
        await view.ready(timeout_s=60)
        expected = {b: ("hard_limit" if p >= 100 else "soft_limit" if p >= 75 else "normal") for b, p in TARGET.items()}
        await wait_for(lambda: all(view.status(b).status == s for b, s in expected.items()), what="statuses")
        cloud, local = Candidate("gpt-4o", "cloud", 1.0), Candidate("llama3.1:8b", "local", 0.5)

        assert view.decide("r", ["r:normal"], [cloud, local]).candidates == (cloud, local)
        for budget, u in (("r:80", 80), ("r:90", 90), ("r:99", 99)):
            allowed = sum(view.decide(f"q-{i}", [budget], [cloud, local]).cloud_allowed for i in range(10_000))
            assert abs(allowed / 100 - (100 - u) / 25 * 100) <= 2.0, (budget, allowed)
        # Hard, for each action, with and without a local model.
        warned = view.decide("r", ["r:hard-warn"], [cloud, local])
        assert warned.candidates == (local, cloud)
        assert warned.fallbacks == (cloud,)
        assert view.decide("r", ["r:hard-warn"], [cloud]).candidates == (cloud,)
        assert view.decide("r", ["r:hard-cloud"], [cloud, local]).candidates == (local,)  # no cloud fallback
        assert view.decide("r", ["r:hard-cloud"], [cloud]).rejection is not None
        assert view.decide("r", ["r:hard-all"], [cloud, local]).rejection is not None
        # Several budgets: the smallest share, and the strictest block.
        allowed = sum(view.decide(f"q-{i}", ["r:80", "r:99"], [cloud, local]).cloud_allowed for i in range(10_000))
        assert abs(allowed / 100 - 4.0) <= 2.0
        blocked = view.decide("r", ["r:hard-cloud", "r:hard-all"], [cloud, local])
        assert blocked.rejection is not None
        assert blocked.rejection.budget_id == "r:hard-all"
        # Rollover on read: next month, a spent budget is normal again.
        next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, 0, 0, 1, tzinfo=UTC)
        assert view.decide("r", ["r:hard-all"], [cloud], now=next_month).rejection is None
        # An older seq never overwrites a newer one, even written straight to the topic.
        current = view._statuses["r:hard-all"]
        forged = BudgetStatus(
            budget_id="r:hard-all",
            period=current.period,
            status="normal",
            spend_usd=0,
            settled_usd=0,
            reserved_usd=0,
            limit_usd=current.limit,
            remaining_usd=current.limit,
            utilization_percent=0.0,
            soft_limit_percent=75,
            hard_limit_action="block_all",
            as_of=datetime.now(UTC),
            next_reset=next_month,
            reason="refresh",
            partition=current.partition,
            seq=current.seq - 1,
        )
        await pipeline.produce([(topics.status.name, b"r:hard-all", dumps(forged))])
        await wait_for(lambda: view.stale_records > 0, what="the forged status to arrive")
        assert view.status("r:hard-all").status == "hard_limit"
        await _check_view_serve(pipeline)
        # Stale, then expired (stale_mode open): the aggregate stops, its heartbeats age.
        aggregate.stop()
        await wait_for(lambda: view.status("r:hard-all").stale, timeout_s=30, what="staleness")
        assert view.status("r:hard-all").status == "hard_limit"
        assert "stale" in view.decide("r", ["r:hard-all"], [cloud, local]).flags
        await wait_for(lambda: view.status("r:hard-all").status == "normal", timeout_s=30, what="expiry")
        assert view.decide("r", ["r:hard-all"], [cloud, local]).rejection is None


async def _check_view_serve(pipeline: Any) -> None:
    """`budgetflow view serve` answers the same over HTTP, for gateways not written in Python."""
    import subprocess

    import aiohttp

    from budgetflow.streams.dev.localkafka import free_port

    port = free_port()
    proc = subprocess.Popen(
        pipeline_cmd("view", "serve", "--port", str(port)),
        env=pipeline.env_base,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get(f"{base}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "view serve never became ready"
                await asyncio.sleep(0.3)
            candidates = [{"name": "gpt-4o", "backend": "cloud", "score": 1}, {"name": "llama", "backend": "local"}]
            async with http.post(
                f"{base}/v1/decide", json={"request_id": "r", "budgets": ["r:hard-all"], "candidates": candidates}
            ) as response:
                answer = await response.json()
            assert answer["candidates"] == []
            assert answer["error"]["status"] == 429
            assert answer["error"]["headers"]["x-should-retry"] == "false"
            assert answer["error"]["body"]["error"]["code"] == "budget_exceeded"
            async with http.post(
                f"{base}/v1/decide", json={"request_id": "r", "budgets": ["r:hard-cloud"], "candidates": candidates}
            ) as response:
                answer = await response.json()
            assert [c["backend"] for c in answer["candidates"]] == ["local"]
            assert answer["headers"]["X-Budget-Status"] == "hard_limit"
            async with http.get(f"{base}/v1/status/r:80") as response:
                assert (await response.json())["status"] == "soft_limit"
            async with http.post(f"{base}/v1/decide", json={"request_id": "r"}) as response:
                assert response.status == 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def pipeline_cmd(*args: str) -> list[str]:
    import sys
    from pathlib import Path

    return [str(Path(sys.executable).with_name("budgetflow")), *args]
