"""The example gateway answers real HTTP requests with budget headers, and 429s an OpenAI client does not retry;
it makes the request ids and charges the budgets the caller's key allows, whatever the caller says."""

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
OTHER_KEY = "sk-test-other-key"


def key_file(path: Path, keys: dict[str, list[str]]) -> Path:
    """The gateway's key file: each key's SHA-256 and the budgets it may be charged to."""
    lines = ["keys:"]
    for i, (key, budgets) in enumerate(keys.items()):
        digest = hashlib.sha256(key.encode()).hexdigest()
        lines.append(f'  - {{name: key-{i}, sha256: "{digest}", budgets: [{", ".join(budgets)}]}}')
    path.write_text("\n".join(lines) + "\n")
    return path


def start_gateway(pipeline: Any, tmp_path: Path, keys: Path, *args: str) -> tuple[subprocess.Popen[bytes], str, Any]:
    from budgetflow.streams.dev.localkafka import free_port

    port = free_port()
    env = dict(pipeline.env_base, BUDGETFLOW_DATA_DIR=str(tmp_path / "gateway"))
    log = (tmp_path / "gateway.log").open("wb")
    gateway = subprocess.Popen(
        [sys.executable, str(GATEWAY), "--port", str(port), "--keys", str(keys), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return gateway, f"http://127.0.0.1:{port}", log


async def wait_ready(http: aiohttp.ClientSession, base: str, gateway: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            async with http.get(f"{base}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert gateway.poll() is None, "the gateway exited"
        assert time.monotonic() < deadline, "the gateway never answered"
        await asyncio.sleep(0.3)


async def test_gateway_headers_and_unretried_429(pipeline_factory: Any, tmp_path: Path) -> None:
    pipeline = pipeline_factory(clock_start=datetime.now(UTC).isoformat(), speed=1.0)
    policies = pipeline.root / "policies.yaml"
    # One gpt-4o answer of the fake model costs about $0.0007: soft after a couple, hard after about fifteen.
    policies.write_text(
        f'budgets:\n  - {{id: "{KEY_BUDGET}", monthly_limit_usd: "0.01", soft_limit_percent: 10, '
        f'hard_limit_action: block_all}}\n  - {{id: "team:gw", monthly_limit_usd: "100"}}\n'
    )
    assert pipeline.cli("policy", "apply", str(policies)).returncode == 0
    pipeline.start("enrich")
    pipeline.start("aggregate")
    gateway, base, log = start_gateway(pipeline, tmp_path, key_file(tmp_path / "keys.yaml", {API_KEY: ["team:gw"]}))
    try:
        async with aiohttp.ClientSession() as http:

            async def seen() -> int:
                async with http.get(f"{base}/healthz") as response:
                    return int((await response.json())["requests_seen"])

            await wait_ready(http, base, gateway)

            client = openai.OpenAI(
                api_key=API_KEY, base_url=f"{base}/v1", max_retries=3, default_headers={"X-Budget-Ids": "team:gw"}
            )
            raw = await asyncio.to_thread(
                client.chat.completions.with_raw_response.create,
                model="gpt-4o",
                messages=[{"role": "user", "content": "hello " * 20}],
                max_tokens=64,
            )
            assert raw.headers["x-budget-cost-estimated"]
            assert raw.headers["x-budgetflow-backend"] == "cloud"
            assert raw.parse().choices[0].message.content
            # Wait for the pipeline to see the spend, then push the key over its hard limit.
            status_seen = False
            for _ in range(60):
                raw = await asyncio.to_thread(
                    client.chat.completions.with_raw_response.create,
                    model="gpt-4o",
                    messages=[{"role": "user", "content": "more"}],
                    max_tokens=64,
                )
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
                    await asyncio.to_thread(
                        client.chat.completions.create,
                        model="gpt-4o",
                        messages=[{"role": "user", "content": "again"}],
                        max_tokens=64,
                    )
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


async def test_the_gateway_makes_request_ids_and_charges_what_the_key_allows(
    pipeline_factory: Any, tmp_path: Path
) -> None:
    """Five calls with one X-Request-Id are five charges; X-Budget-Ids narrows a key's budgets and adds none."""
    pipeline = pipeline_factory(clock_start=datetime.now(UTC).isoformat(), speed=1.0)
    assert pipeline.cli("topics", "create").returncode == 0
    pipeline.start("enrich")
    pipeline.start("aggregate")
    keys = key_file(tmp_path / "keys.yaml", {API_KEY: ["team:a", "team:b"], OTHER_KEY: ["team:c"]})
    gateway, base, log = start_gateway(pipeline, tmp_path, keys)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    mine = {"Authorization": f"Bearer {API_KEY}"}
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, base, gateway)

            async def call(headers: dict[str, str]) -> aiohttp.ClientResponse:
                async with http.post(f"{base}/v1/chat/completions", json=body, headers=headers) as response:
                    await response.read()
                    return response

            ids, period = set(), ""
            for _ in range(5):  # a caller replaying one id: each call is a call, and is charged
                response = await call({**mine, "X-Request-Id": "caller-chosen-1"})
                assert response.status == 200
                assert response.headers["X-Client-Request-Id"] == "caller-chosen-1", "the caller's id is a label"
                ids.add(response.headers["X-Request-Id"])
                period = response.headers["X-Budgetflow-Period"]
            assert len(ids) == 5
            assert all(i.startswith("gw-") for i in ids)
            # A header may narrow the key's budgets (to none, with an empty one) and may not add any.
            assert (await call({**mine, "X-Budget-Ids": "team:a"})).status == 200
            assert (await call({**mine, "X-Budget-Ids": ""})).status == 200
            for asked in ("team:c", "team:a, team:c", "global", KEY_BUDGET, "team:z"):
                response = await call({**mine, "X-Budget-Ids": asked})
                assert response.status == 403, asked
            # No key, an unknown key, a key's hash, a malformed header: not a caller.
            digest = hashlib.sha256(API_KEY.encode()).hexdigest()
            for headers in (
                {},
                {"Authorization": "Bearer sk-unknown"},
                {"Authorization": f"Bearer {digest}"},
                {"Authorization": API_KEY},
                {"Authorization": "Basic " + API_KEY},
            ):
                response = await call({**headers, "X-Budget-Ids": "team:a"})
                assert response.status == 401, headers
            assert (await call({"Authorization": f"Bearer {OTHER_KEY}"})).status == 200

        other = "key:" + hashlib.sha256(OTHER_KEY.encode()).hexdigest()[:8]
        want = {"team:a": 6, "team:b": 5, KEY_BUDGET: 7, "team:c": 1, other: 1, "global": 8}
        deadline = time.monotonic() + 90
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            states = await pipeline.period_states()
            counts = {budget: s.requests for (budget, p), s in states.items() if p == period}
            if counts == want:
                break
            await asyncio.sleep(0.5)
        assert counts == want, pipeline.logs()
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        log.close()
    assert API_KEY not in (tmp_path / "gateway.log").read_text()
