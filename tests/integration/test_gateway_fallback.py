"""The example gateway on the real pipeline: a shifted request keeps cloud as its fallback when the local model
fails (at the soft limit, and at the hard limit with warn), never with block_cloud; and X-Budget-Cost-Estimated is
on every answer, the estimate of the model called (or refused)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from integration.test_gateway import API_KEY, key_file, start_gateway, wait_ready
from integration.test_routing import usage  # a usage event that spends a percent of a $1 budget

pytestmark = pytest.mark.timeout(300)

POLICIES = """
budgets:
  - {id: "fb:soft", monthly_limit_usd: "1.00", hard_limit_action: warn}
  - {id: "fb:warn", monthly_limit_usd: "1.00", hard_limit_action: warn}
  - {id: "fb:block", monthly_limit_usd: "1.00", hard_limit_action: block_cloud}
  - {id: "fb:all", monthly_limit_usd: "1.00", hard_limit_action: block_all}
"""
# test-small's output rate is $2.50 per million tokens: 4,000 output tokens per cent of a $1 limit.
FILL = {"fb:soft": 95, "fb:warn": 110, "fb:block": 110, "fb:all": 110}
EXPECTED = {"fb:soft": "soft_limit", "fb:warn": "hard_limit", "fb:block": "hard_limit", "fb:all": "hard_limit"}
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 32}
ESTIMATE = re.compile(r"^\d+\.\d{6}$")


async def test_a_failing_local_model_falls_back_to_cloud_unless_cloud_is_blocked(
    pipeline_factory: Any, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    pipeline = pipeline_factory(clock_start=now.isoformat(), speed=1.0)
    (pipeline.root / "policies.yaml").write_text(POLICIES)
    assert pipeline.cli("policy", "apply", str(pipeline.root / "policies.yaml")).returncode == 0
    pipeline.start("enrich")
    pipeline.start("aggregate")
    await pipeline.produce([(pipeline.topics.usage.name, b.encode(), usage(b, p, now)[2]) for b, p in FILL.items()])
    down = tmp_path / "local-down"
    keys = key_file(tmp_path / "keys.yaml", {API_KEY: list(FILL)})
    gateway, base, log = start_gateway(pipeline, tmp_path, keys, "--local-down-file", str(down))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    answers: list[aiohttp.ClientResponse] = []
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, base, gateway)

            async def call(budget: str, body: Any = BODY, **headers: str) -> aiohttp.ClientResponse:
                sent = {**auth, "X-Budget-Ids": budget, **headers}
                async with http.post(f"{base}/v1/chat/completions", json=body, headers=sent) as response:
                    await response.read()
                    answers.append(response)
                    return response

            deadline = time.monotonic() + 90
            for budget, status in EXPECTED.items():  # the fills reach the gateway's view
                while (await call(budget)).headers.get("X-Budget-Status") != status:
                    assert time.monotonic() < deadline, f"{budget} never showed {status}"
                    await asyncio.sleep(0.3)

            # The local model up: a shifted request is served locally, and estimated at the local model's cost.
            soft = [await call("fb:soft") for _ in range(20)]
            local = [r for r in soft if r.headers["X-Budgetflow-Backend"] == "local"]
            cloud = [r for r in soft if r.headers["X-Budgetflow-Backend"] == "cloud"]
            assert local, "at 95 % of a soft limit of 75, most requests go local"
            assert all(r.headers["X-Budget-Cost-Estimated"] == "0.000000" for r in local)
            assert all(float(r.headers["X-Budget-Cost-Estimated"]) > 0 for r in cloud)
            assert all("X-Budgetflow-Fallback" not in r.headers for r in soft)

            # The local model down: shifted requests fall back to cloud at the soft limit and with warn...
            down.touch()
            soft = [await call("fb:soft") for _ in range(20)]
            assert all(r.status == 200 and r.headers["X-Budgetflow-Backend"] == "cloud" for r in soft)
            fell_back = [r for r in soft if r.headers.get("X-Budgetflow-Fallback") == "true"]
            assert fell_back, "no shifted request fell back to cloud at the soft limit"
            assert all(float(r.headers["X-Budget-Cost-Estimated"]) > 0 for r in fell_back)
            warned = [await call("fb:warn") for _ in range(5)]
            assert all(r.status == 200 and r.headers["X-Budgetflow-Fallback"] == "true" for r in warned)
            assert all(r.headers["X-Budgetflow-Model"] == "gpt-4o" for r in warned)
            # ...and never with block_cloud: no model is left to answer.
            blocked = [await call("fb:block") for _ in range(5)]
            assert all(r.status == 502 and "X-Budgetflow-Backend" not in r.headers for r in blocked)
            async with http.get(f"{base}/metrics") as response:
                metrics = await response.text()
            assert f"budgetflow_router_fallbacks_total {float(len(fell_back) + len(warned))}" in metrics

            # Rejections carry the estimate of what they refused; requests refused unread say 0.
            refused = await call("fb:all")
            assert refused.status == 429
            assert float(refused.headers["X-Budget-Cost-Estimated"]) > 0
            other = await call("team:nobody")
            assert other.status == 403
            assert float(other.headers["X-Budget-Cost-Estimated"]) > 0
            assert (await call("fb:soft", {"model": "gpt-4o"})).status == 400
            async with http.post(f"{base}/v1/chat/completions", json=BODY) as response:
                assert response.status == 401
                assert response.headers["X-Budget-Cost-Estimated"] == "0.000000"
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        log.close()
    statuses = {r.status for r in answers}
    assert {200, 400, 403, 429, 502} <= statuses
    assert all(ESTIMATE.match(r.headers.get("X-Budget-Cost-Estimated", "")) for r in answers), "an answer without it"
    assert API_KEY not in (tmp_path / "gateway.log").read_text()
    assert hashlib.sha256(API_KEY.encode()).hexdigest() not in (tmp_path / "gateway.log").read_text()
