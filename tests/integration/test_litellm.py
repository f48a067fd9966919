"""budgetflow inside a real LiteLLM proxy (models mocked with LiteLLM's ``mock_response``): the ledger equals the
usage LiteLLM reported, priced by our table, to the pico-dollar, through one proxy worker and through two; the
shift to the local group follows the rule; a block_all budget answers 429s the OpenAI SDK does not retry; a
failing local group falls back to cloud and its attempt settles at 0; prompts stay out of the topics."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from integration.conftest import TEST_PRICES
from integration.test_routing import usage as fill_usage  # a usage event that spends a percent of a $1 budget
from litellm_proxy import HAVE_LITELLM, SKIP_REASON, Proxy, chat, key_budget, model

pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(not HAVE_LITELLM, reason=SKIP_REASON)]

# Odd rates, so that a rounding or a double count shows in the last digits.
PRICES = (
    TEST_PRICES
    + """
  - match: "gpt-4o"
    provider: openai
    input_usd_per_mtok: "2.500001"
    output_usd_per_mtok: "10.000003"
    source: "integration tests"
  - match: "gpt-4o-cheap"
    provider: openai
    input_usd_per_mtok: "0.000001"
    output_usd_per_mtok: "0.000001"
    source: "integration tests: a cloud model whose spend does not move the budgets under test"
  - match: "llama3.1"
    provider: ollama
    backend: local
    input_usd_per_mtok: "0"
    output_usd_per_mtok: "0"
    source: "integration tests"
"""
)
ALPHA, BETA = "sk-alpha-0001", "sk-beta-0002"


def price_of(table: Any, usage: dict[str, Any], name: str = "gpt-4o") -> int:
    details = usage.get("prompt_tokens_details") or {}
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return table.cost(
        name,
        input_tokens=usage["prompt_tokens"],
        output_tokens=usage["completion_tokens"],
        cached_input_tokens=details.get("cached_tokens") or 0,
        reasoning_tokens=reasoning,
        provider="openai",
    ).pico_usd


def start_pipeline(pipeline_factory: Any) -> Any:
    pipeline = pipeline_factory(clock_start=datetime.now(UTC).isoformat(), speed=1.0)
    (pipeline.root / "prices.yaml").write_text(PRICES)
    pipeline.start("enrich")
    pipeline.start("aggregate")
    return pipeline


async def wait_settled(pipeline: Any, expected: dict[str, int], timeout_s: float = 180) -> dict[str, Any]:
    """Wait until each budget's settled spend is the expected one and nothing is reserved; the states then."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {b: s for (b, _), s in (await pipeline.period_states()).items()}
        got = {b: (states[b].settled, states[b].reserved) if b in states else None for b in expected}
        if all(got[b] == (pico, 0) for b, pico in expected.items()):
            return states
        assert time.monotonic() < deadline, f"ledger never settled: {got} != {expected}\n{pipeline.logs()}"
        await asyncio.sleep(1)


@pytest.mark.parametrize("workers", [1, 2])
async def test_ledger_equals_litellm_usage_priced_by_our_table(
    pipeline_factory: Any, tmp_path: Path, workers: int
) -> None:
    from budgetflow.tokenizers import PriceTable

    pipeline = start_pipeline(pipeline_factory)
    table = PriceTable.from_settings(pipeline.settings().pricing)  # enrich's table
    keys = {
        ALPHA: {"team_id": "alpha", "metadata": {"budgetflow_budgets": ["project:x"]}},
        BETA: {},
    }
    proxy = Proxy(
        pipeline.env_base,
        tmp_path / "proxy",
        models=[model("gpt-4o", "openai/gpt-4o")],
        keys=keys,
        workers=workers,
        env={"BUDGETFLOW_LITELLM__PUBLISH_PROMPTS": "true"},
    ).start()
    n, concurrency = 2_000, 100
    expected: Counter[str] = Counter()
    request_ids: list[str] = []
    gate = asyncio.Semaphore(concurrency)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, force_close=True)) as http:
            await proxy.ready(http)

            async def one(i: int) -> None:
                key = ALPHA if i % 3 else BETA
                body: dict[str, Any] = {
                    "model": "gpt-4o",
                    "messages": [{"role": "user", "content": "word " * (1 + i % 97)}],
                    "max_tokens": 64,
                }
                if i % 2:  # half of them streamed, their usage counted by LiteLLM
                    body |= {"stream": True, "stream_options": {"include_usage": True}}
                async with gate:
                    status, headers, usage, error = await chat(http, proxy, key, body)
                assert status == 200, (status, error, proxy.tail())
                assert usage is not None
                assert usage["completion_tokens"] > 0
                pico = price_of(table, usage)
                budgets = [key_budget(key), "global"] + (["team:alpha", "project:x"] if key == ALPHA else [])
                for budget in budgets:
                    expected[budget] += pico
                request_ids.append(headers["x-budgetflow-request-id"])

            await asyncio.gather(*(one(i) for i in range(n)))
        states = await wait_settled(pipeline, dict(expected))
    finally:
        proxy.stop()
        pipeline.close()
    assert len(set(request_ids)) == n
    assert states["global"].settles == n, "every request settled once"
    usage_records = [orjson.loads(v) for _, _, v, _ in await pipeline.records(pipeline.topics.usage.name) if v]
    assert Counter(r["request_id"] for r in usage_records) == Counter(request_ids), "one usage event per request"


POLICIES = """
budgets:
  - {id: "ll:soft", monthly_limit_usd: "1.00", soft_limit_percent: 75, hard_limit_action: warn}
  - {id: "ll:warn", monthly_limit_usd: "1.00", hard_limit_action: warn}
  - {id: "ll:all", monthly_limit_usd: "1.00", hard_limit_action: block_all}
"""
FILL = {"ll:soft": 90, "ll:warn": 110, "ll:all": 110}
EXPECTED = {"ll:soft": "soft_limit", "ll:warn": "hard_limit", "ll:all": "hard_limit"}
SECRET = "the-prompt-text-that-must-not-leave-the-proxy"


# One proxy for the routing rules (a proxy takes seconds to start): the share at the soft limit, the 429 of
# block_all through the OpenAI SDK, the fallback from a failing local group, and prompts kept out of the topics.
async def test_shift_block_and_fallback_through_the_proxy(pipeline_factory: Any, tmp_path: Path) -> None:
    import openai

    from budgetflow.streams.gateway.routing import cloud_share

    pipeline = start_pipeline(pipeline_factory)
    (pipeline.root / "policies.yaml").write_text(POLICIES)
    assert pipeline.cli("policy", "apply", str(pipeline.root / "policies.yaml")).returncode == 0
    now = datetime.now(UTC)
    await pipeline.produce(
        [(pipeline.topics.usage.name, b.encode(), fill_usage(b, p, now)[2]) for b, p in FILL.items()]
    )
    keys = {f"sk-{b.replace(':', '-')}": {"metadata": {"budgetflow_budgets": [b]}} for b in FILL}
    down = "http://127.0.0.1:9/v1"  # the discard port: nothing listens, the local model is down
    proxy = Proxy(
        pipeline.env_base,
        tmp_path / "proxy",
        models=[
            model("gpt-4o-cheap", "openai/gpt-4o-cheap"),
            model("llama3.1", "ollama/llama3.1", mock="a local answer"),
            model("gpt-4o-fb", "openai/gpt-4o-cheap"),
            model("llama-down", "ollama/llama3.1", mock=None, api_base=down, num_retries=0),
        ],
        keys=keys,
        env={"BUDGETFLOW_LITELLM__LOCAL_MODELS": '{"gpt-4o-cheap": "llama3.1", "gpt-4o-fb": "llama-down"}'},
    ).start()
    body = {"model": "gpt-4o-cheap", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 16}
    try:
        async with aiohttp.ClientSession() as http:
            await proxy.ready(http)
            deadline = time.monotonic() + 90
            for budget, status in EXPECTED.items():  # the fills reach the proxy's view
                key = f"sk-{budget.replace(':', '-')}"
                while (await chat(http, proxy, key, body))[1].get("x-budget-status") != status:
                    assert time.monotonic() < deadline, f"{budget} never showed {status}\n{proxy.tail()}"
                    await asyncio.sleep(0.3)

            # At 90 % of a $1 budget with a soft limit of 75, the cloud share is the rule's; the rest go local.
            answers = [await chat(http, proxy, "sk-ll-soft", body) for _ in range(400)]
            assert all(a[0] == 200 for a in answers)
            cloud = sum(a[1]["x-budgetflow-backend"] == "cloud" for a in answers) / len(answers)
            assert abs(cloud - cloud_share(90, 75, "soft_limit")) <= 0.1, cloud  # 4 standard deviations
            assert all(
                a[1]["x-litellm-model-group"] == "llama3.1" for a in answers if a[1]["x-budgetflow-backend"] == "local"
            )

            # Past the hard limit with warn, every request goes local first; the local group down, each falls back
            # to cloud, and the failed local attempt is settled at 0.
            fb = {**body, "model": "gpt-4o-fb"}
            fell = [await chat(http, proxy, "sk-ll-warn", fb) for _ in range(5)]
            assert all(a[0] == 200 and a[1]["x-budgetflow-fallback"] == "true" for a in fell), fell[0]
            assert all(a[1]["x-budgetflow-backend"] == "cloud" for a in fell)
            fallen = {a[1]["x-budgetflow-request-id"] for a in fell}

        # block_all past the hard limit: a 429 the OpenAI SDK does not retry, with the budget in the body.
        sent: list[httpx.Request] = []

        async def count(request: httpx.Request) -> None:
            sent.append(request)

        async with httpx.AsyncClient(event_hooks={"request": [count]}) as transport:
            client = openai.AsyncOpenAI(
                base_url=f"{proxy.base}/v1", api_key="sk-ll-all", max_retries=3, http_client=transport
            )
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="gpt-4o-cheap", messages=body["messages"], max_tokens=16)
        assert len(sent) == 1, "the SDK did not retry"
        headers = refused.value.response.headers
        assert headers["x-should-retry"] == "false"
        assert int(headers["retry-after"]) > 0
        assert headers["x-budget-status"] == "hard_limit"
        assert "x-budget-cost-estimated" in headers
        assert "ll:all" in refused.value.response.text
    finally:
        proxy.stop()
        pipeline.close()

    usage_events = [orjson.loads(v) for _, _, v, _ in await pipeline.records(pipeline.topics.usage.name) if v]
    attempts = {(u["request_id"], u["attempt"]): u for u in usage_events if u["request_id"] in fallen}
    assert len(attempts) == 2 * len(fallen)
    for request_id in fallen:
        failed, served = attempts[(request_id, 0)], attempts[(request_id, 1)]
        assert (failed["outcome"], failed["backend"], failed["input_tokens"], failed["output_tokens"]) == (
            "failed",
            "local",
            0,
            0,
        )
        assert (served["outcome"], served["backend"]) == ("completed", "cloud")
    raw = b"".join(v or b"" for _, _, v, _ in await pipeline.records(pipeline.topics.requests.name))
    assert raw, "no request event was published"
    assert SECRET.encode() not in raw, "the prompt text was published"
    assert b'"input_bytes"' in raw


# The broker away: the proxy still answers (VIEW__STALE_MODE open: as budgets were; closed: local only, or a 503),
# usage waits in the worker's spool, and a proxy started again on the same data dir sends it: the ledger is exact.
async def test_a_proxy_without_its_broker_serves_spools_and_settles_later(
    pipeline_factory: Any, tmp_path: Path
) -> None:
    from budgetflow.streams.dev.localkafka import free_port
    from budgetflow.tokenizers import PriceTable

    pipeline = start_pipeline(pipeline_factory)
    table = PriceTable.from_settings(pipeline.settings().pricing)
    away = {**pipeline.env_base, "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    models = [
        model("gpt-4o", "openai/gpt-4o"),
        model("gpt-4o-solo", "openai/gpt-4o"),  # no local group to shift to
        model("llama3.1", "ollama/llama3.1", mock="a local answer"),
    ]
    env = {"BUDGETFLOW_LITELLM__READY_TIMEOUT_S": "1", "BUDGETFLOW_LITELLM__LOCAL_MODELS": '{"gpt-4o": "llama3.1"}'}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "while the broker is away"}]}
    spent = 0
    for mode in ("open", "closed"):
        stale = {**env, "BUDGETFLOW_VIEW__STALE_MODE": mode}
        proxy = Proxy(away, tmp_path / "proxy", models=models, keys={ALPHA: {}}, env=stale).start()
        try:
            async with aiohttp.ClientSession() as http:
                await proxy.ready(http)
                answers = [await chat(http, proxy, ALPHA, body) for _ in range(5)]
                only_cloud = await chat(http, proxy, ALPHA, {**body, "model": "gpt-4o-solo"})
        finally:
            proxy.stop()
        assert all(a[0] == 200 for a in answers), answers[0]
        backends = {a[1]["x-budgetflow-backend"] for a in answers}
        assert backends == ({"cloud"} if mode == "open" else {"local"}), (mode, backends)
        spent += sum(price_of(table, a[2]) for a in answers if a[1]["x-budgetflow-backend"] == "cloud")
        assert only_cloud[0] == (200 if mode == "open" else 503), only_cloud
        if mode == "open":
            spent += price_of(table, only_cloud[2])
    assert spent > 0
    # Started again next to its broker, the proxy sends what its spool kept; the ledger is exact.
    proxy = Proxy(pipeline.env_base, tmp_path / "proxy", models=models, keys={ALPHA: {}}, env=env).start()
    try:
        async with aiohttp.ClientSession() as http:
            await proxy.ready(http)
            await wait_settled(pipeline, {key_budget(ALPHA): spent})
    finally:
        proxy.stop()
        pipeline.close()


# What LiteLLM does between the hooks: it retries, falls back, times out, answers from its cache, and honours a
# caller's "no-log". Each request settles what was spent: a retry that succeeded at its usage (LiteLLM logs one
# success per request, not one per attempt), every attempt of a request that failed at 0, a timed-out one left to
# expire at its estimate, a cache hit at 0; "no-log" does not hide usage.
async def test_retries_fallbacks_timeouts_cache_and_no_log_settle_what_was_spent(
    pipeline_factory: Any, tmp_path: Path
) -> None:
    from fake_openai import USAGE, FakeOpenAI

    from budgetflow.tokenizers import PriceTable

    pipeline = start_pipeline(pipeline_factory)
    table = PriceTable.from_settings(pipeline.settings().pricing)
    async with FakeOpenAI(hang_s=5) as upstream:
        proxy = Proxy(
            pipeline.env_base,
            tmp_path / "proxy",
            models=[
                model("up", "openai/gpt-4o", mock=None, api_base=upstream.base, timeout=1.5),
                model("down-local", "ollama/llama3.1", mock=None, api_base="http://127.0.0.1:9", num_retries=0),
            ],
            keys={ALPHA: {}},
            env={"BUDGETFLOW_LITELLM__LOCAL_MODELS": '{"up": "down-local"}'},
            router_settings={"num_retries": 1},
            litellm_settings={"cache": True, "cache_params": {"type": "local"}},
        ).start()

        def ask(text: str, **extra: Any) -> dict[str, Any]:
            return {"model": "up", "messages": [{"role": "user", "content": text}], "max_tokens": 50, **extra}

        try:
            async with aiohttp.ClientSession() as http:
                await proxy.ready(http)
                retried = await chat(http, proxy, ALPHA, ask("FAILONCE a retry that succeeds"))
                failed = await chat(http, proxy, ALPHA, ask("FAILALWAYS cloud fails, its local fallback is down"))
                timed_out = await chat(http, proxy, ALPHA, ask("HANG past the deployment's timeout"))
                first = await chat(http, proxy, ALPHA, ask("the same question twice", caching=True))
                cached = await chat(http, proxy, ALPHA, ask("the same question twice", caching=True))
                unlogged = await chat(http, proxy, ALPHA, ask("no-log asked by the caller", **{"no-log": True}))
        finally:
            proxy.stop()
    assert upstream.hits["FAILONCE a retry that succeeds"] == 2
    assert (retried[0], failed[0], first[0], cached[0], unlogged[0]) == (200, 500, 200, 200, 200), failed
    assert timed_out[0] != 200
    assert upstream.hits["the same question twice"] == 1, "the second answer came from LiteLLM's cache"
    ids = {
        name: answer[1]["x-budgetflow-request-id"]
        for name, answer in {
            "retried": retried,
            "failed": failed,
            "timed_out": timed_out,
            "first": first,
            "cached": cached,
            "unlogged": unlogged,
        }.items()
    }
    priced = price_of(table, USAGE)
    deadline = time.monotonic() + 120
    while True:
        events = [orjson.loads(v) for _, _, v, _ in await pipeline.records(pipeline.topics.usage.name) if v]
        usage = {(e["request_id"], e["attempt"]): e for e in events}
        if len(usage) >= 6 or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    pipeline.close()

    def tokens(name: str, attempt: int = 0) -> tuple[str, int, int] | None:
        event = usage.get((ids[name], attempt))
        return None if event is None else (event["outcome"], event["input_tokens"], event["output_tokens"])

    assert tokens("retried") == ("completed", 11, 7), "the retry's usage settles the request's one attempt"
    assert tokens("failed", 0) == ("failed", 0, 0)
    assert tokens("failed", 1) == ("failed", 0, 0), "the local fallback's attempt is settled too"
    assert tokens("timed_out") is None, "a timed-out attempt is left to expire at its estimate"
    assert tokens("first") == ("completed", 11, 7)
    assert tokens("cached") in (None, ("completed", 0, 0)), "a cache hit spent nothing"
    assert tokens("unlogged") == ("completed", 11, 7), "no-log does not hide usage"
    states = await wait_settled_or_reserved(pipeline, key_budget(ALPHA))
    assert states.settled == 3 * priced
    assert states.reserved > 0, "the timed-out attempt stays reserved"


async def wait_settled_or_reserved(pipeline: Any, budget: str) -> Any:
    deadline = time.monotonic() + 60
    while True:
        states = {b: s for (b, _), s in (await pipeline.period_states()).items()}
        if budget in states and states[budget].settles >= 5:
            return states[budget]
        assert time.monotonic() < deadline, states.get(budget)
        await asyncio.sleep(1)
