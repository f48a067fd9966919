"""The example gateway answers real HTTP requests with budget headers, and 429s an OpenAI client does not retry."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

pytestmark = pytest.mark.timeout(300)

GATEWAY = Path(__file__).resolve().parents[2] / "examples" / "gateway.py"
API_KEY = "sk-test-secret-key"
KEY_BUDGET = "key:" + hashlib.sha256(API_KEY.encode()).hexdigest()[:8]


async def test_gateway_headers_and_unretried_429(pipeline_factory: Any, tmp_path: Path) -> None:
    from budgetflow.streams.localkafka import free_port

    pipeline = pipeline_factory(clock_start=datetime.now(UTC).isoformat(), speed=1.0)
    policies = pipeline.root / "policies.yaml"
    # One gpt-4o answer of the fake model costs about $0.0007: soft after a couple, hard after about fifteen.
    policies.write_text(f'budgets:\n  - {{id: "{KEY_BUDGET}", monthly_limit_usd: "0.01", soft_limit_percent: 10, '
                        f'hard_limit_action: block_all}}\n  - {{id: "team:gw", monthly_limit_usd: "100"}}\n')  # fmt: skip
    assert pipeline.cli("policy", "apply", str(policies)).returncode == 0
    pipeline.start("enrich")
    pipeline.start("aggregate")
    port = free_port()
    env = dict(pipeline.env_base, BUDGETFLOW_DATA_DIR=str(tmp_path / "gateway"))
    log = (tmp_path / "gateway.log").open("wb")
    gateway = subprocess.Popen([sys.executable, str(GATEWAY), "--port", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def seen() -> int:
                async with http.get(f"{base}/healthz") as response:
                    return int((await response.json())["requests_seen"])

            deadline = time.monotonic() + 60
            while True:
                try:
                    if await seen() >= 0:
                        break
                except aiohttp.ClientError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.3)

            client = openai.OpenAI(api_key=API_KEY, base_url=f"{base}/v1", max_retries=3,
                                   default_headers={"X-Budget-Ids": "team:gw"})  # fmt: skip
            raw = await asyncio.to_thread(
                client.chat.completions.with_raw_response.create,
                model="gpt-4o", messages=[{"role": "user", "content": "hello " * 20}], max_tokens=64,
            )  # fmt: skip
            assert raw.headers["x-budget-cost-estimated"]
            assert raw.headers["x-budgetflow-backend"] == "cloud"
            assert raw.parse().choices[0].message.content
            # Wait for the pipeline to see the spend, then push the key over its hard limit.
            status_seen = False
            for _ in range(60):
                raw = await asyncio.to_thread(
                    client.chat.completions.with_raw_response.create,
                    model="gpt-4o", messages=[{"role": "user", "content": "more"}], max_tokens=64,
                )  # fmt: skip
                if raw.headers.get("x-budget-status"):
                    status_seen = True
                    assert raw.headers["x-budget-id"] == KEY_BUDGET
                    assert raw.headers["x-budget-reset"].endswith("Z")
                    float(raw.headers["x-budget-utilization"])
                    break
                await asyncio.sleep(0.5)
            assert status_seen, "the soft limit never showed in the headers"
            # Without a local model to shift to, cloud spend goes on to the hard limit; from then on every
            # call is rejected, and exactly one HTTP request reaches the gateway per call.
            client = client.with_options(default_headers={"X-Budget-Ids": "team:gw", "X-Local-Fallback": "no"})
            for _ in range(60):
                before = await seen()
                try:
                    await asyncio.to_thread(client.chat.completions.create, model="gpt-4o",
                                            messages=[{"role": "user", "content": "again"}], max_tokens=64)  # fmt: skip
                except openai.RateLimitError as error:
                    assert await seen() == before + 1, "the OpenAI client retried a budget 429"
                    body = error.body if isinstance(error.body, dict) else {}
                    assert body.get("code") == "budget_exceeded" or "budget_exceeded" in str(error)
                    assert error.response.headers["x-should-retry"] == "false"
                    assert int(error.response.headers["retry-after"]) > 0
                    assert error.response.headers["x-budget-status"] == "hard_limit"
                    break
                await asyncio.sleep(0.5)
            else:
                raise AssertionError("the key never reached its hard limit")
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        log.close()
    assert API_KEY not in (tmp_path / "gateway.log").read_text()
