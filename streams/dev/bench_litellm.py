"""`budgetflow bench --only litellm`: a cap inside a LiteLLM proxy, budgetflow's beside LiteLLM's own, and the latency
budgetflow's callback adds, measured in the same run (issue #18).

The workload: a $0.50 budget, $0.001 per request, 2,000 requests at concurrency 1, 10 and 100, through one and
through two proxy workers. LiteLLM's mock reports 10 prompt and 20 completion tokens for a call that is not
streamed; the model is priced at $0 and $50 per million tokens in budgetflow's price table (a PRICING__FILE) and in
the proxy's ``model_info``, so $0.001 in both (checked before the run). Each request asks ``max_tokens: 20``, so
budgetflow's reservation is the cost too. Admitted means HTTP 200.

* budgetflow: a ``block_all`` policy of $0.50 on a budget the calling key is charged to (its metadata's
  ``budgetflow_budgets``); the spend is the ledger's settled spend, read from the aggregate's state.
* LiteLLM, as it enforces without its database (its key database needs Prisma): a key's ``max_budget`` (a custom
  auth's UserAPIKeyAuth with ``custom_auth_run_common_checks``; LiteLLM counts the key's spend in each worker's
  memory, Redis absent) and a deployment's ``max_budget``/``budget_duration`` (the router's budget filter, in
  memory too; provider budgets are the same filter). The spend is LiteLLM's reported cost of the admitted
  requests (``x-litellm-response-cost``, summed exactly).

Per worker count, two proxies run one config, one with budgetflow's callback line and one without; the latency is
measured on the pair with one worker, at concurrency 1, their requests interleaved.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

from budgetflow.schemas.money import PICO_PER_USD, format_usd, parse_usd
from budgetflow.schemas.settings import Settings, settings_from_env
from budgetflow.streams.dev.bench_common import bench_env, cap_policies, quantiles_ms, settle_cells
from budgetflow.streams.dev.litellm_proxy import NOT_INSTALLED, Proxy, chat, installed, mocked_model
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now
from budgetflow.streams.service.launch import WorkerProcess

__all__ = ["bench_litellm"]


@dataclass(frozen=True)
class Sizes:
    requests: int
    limit_usd: str
    concurrency: tuple[int, ...]
    workers: tuple[int, ...]
    latency_requests: int
    warm_up: int


FULL = Sizes(2_000, "0.50", (1, 10, 100), (1, 2), 500, 50)
QUICK = Sizes(60, "0.030", (1, 10), (1,), 20, 5)

PER_REQUEST_PICO = 10**9  # $0.001
# What LiteLLM's mock_response reports; with a key budget LiteLLM counts the prompt itself (8 tokens here), which
# costs nothing at $0 input, so only the completion is checked on every answer.
MOCK_USAGE = {"prompt_tokens": 10, "completion_tokens": 20}
MODEL = "bench"  # the model group clients ask for
DEPLOYED = "openai/bench-model"
MODEL_INFO = {"input_cost_per_token": 0.0, "output_cost_per_token": 50 / 1_000_000}
PRICES = """as_of: "2026-11-01"
models:
  - match: "bench-model"
    provider: openai
    input_usd_per_mtok: "0"
    output_usd_per_mtok: "50"
    source: "budgetflow bench: LiteLLM's mocked answer (10 + 20 tokens) costs $0.001"
"""
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
LATENCY_KEY = "sk-bench-latency"
PLAIN_KEY = "sk-bench-plain"
# Without it each refusal of a deployment budget waits through the router's retries (seconds each).
ROUTER_SETTINGS = {"num_retries": 0}
# LiteLLM checks a custom auth's key budget only with this set.
GENERAL_SETTINGS = {"custom_auth_run_common_checks": True}
BUDGETFLOW = ("budgetflow", "block_all policy on a budget of the key")
LITELLM_KEY = ("LiteLLM", "key max_budget (custom auth, spend in memory)")
LITELLM_DEPLOYMENT = ("LiteLLM", "deployment max_budget (router, spend in memory)")
SYSTEMS = (BUDGETFLOW, LITELLM_KEY, LITELLM_DEPLOYMENT)  # the order of the table's rows


def _budget(workers: int, concurrency: int) -> str:
    return f"bench:w{workers}-c{concurrency}"


def _keys(sizes: Sizes) -> dict[str, dict[str, Any]]:
    """The custom auth's keys: per cell one for budgetflow's budget and one with LiteLLM's key budget."""
    keys: dict[str, dict[str, Any]] = {LATENCY_KEY: {}, PLAIN_KEY: {}}
    for w in sizes.workers:
        for c in sizes.concurrency:
            keys[f"sk-bench-bf-w{w}-c{c}"] = {"metadata": {"budgetflow_budgets": [_budget(w, c)]}}
            keys[f"sk-bench-kb-w{w}-c{c}"] = {"max_budget": float(sizes.limit_usd), "spend": 0.0}
    return keys


def _models(sizes: Sizes) -> list[dict[str, Any]]:
    """The model group clients ask for, and per concurrency one with a deployment budget."""
    models = [mocked_model(MODEL, DEPLOYED, model_info=MODEL_INFO)]
    for c in sizes.concurrency:
        models.append(
            mocked_model(
                f"{MODEL}-dep-c{c}",
                DEPLOYED,
                model_info=MODEL_INFO,
                max_budget=float(sizes.limit_usd),
                budget_duration="30d",
            )
        )
    return models


@dataclass
class Burst:
    """What the clients of one cell saw."""

    statuses: Counter[int]
    reported: Decimal  # LiteLLM's x-litellm-response-cost of the admitted requests, summed exactly
    odd: int  # admitted answers not of 20 completion tokens at LiteLLM's $0.001
    elapsed_s: float = 0.0
    before_refusal: int | None = None  # answers admitted before the first refusal (None: nothing refused)

    @property
    def admitted(self) -> int:
        return self.statuses[200]


async def _burst(proxy: Proxy, key: str, model: str, n: int, concurrency: int) -> Burst:
    """``n`` requests by ``concurrency`` clients, each on a new connection (spread over the proxy's workers)."""
    burst = Burst(Counter(), Decimal(0), 0)
    pending = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        began = time.perf_counter()

        async def client() -> None:
            for _ in pending:  # one iterator for all clients: each request once
                status, headers, usage, _ = await chat(http, proxy, key, {"model": model, **BODY})
                burst.statuses[status] += 1
                if status == 200:
                    cost = Decimal(headers.get("x-litellm-response-cost", "0"))
                    burst.reported += cost
                    completion = (usage or {}).get("completion_tokens")
                    burst.odd += (
                        completion != MOCK_USAGE["completion_tokens"] or cost * PICO_PER_USD != PER_REQUEST_PICO
                    )
                elif burst.before_refusal is None:
                    burst.before_refusal = burst.admitted

        await asyncio.gather(*(client() for _ in range(concurrency)))
        burst.elapsed_s = time.perf_counter() - began
    return burst


async def _check_cost(proxy: Proxy, http: aiohttp.ClientSession) -> str:
    """One request: LiteLLM reports the mock's tokens and a cost of $0.001 for it, or the bench is wrong."""
    status, headers, usage, error = await chat(http, proxy, LATENCY_KEY, {"model": MODEL, **BODY})
    if status != 200:
        raise RuntimeError(f"the proxy answered {status}: {error}\n{proxy.tail()}")
    reported = headers.get("x-litellm-response-cost", "")
    got = {k: (usage or {}).get(k) for k in MOCK_USAGE}
    if got != MOCK_USAGE or Decimal(reported or "0") * PICO_PER_USD != PER_REQUEST_PICO:
        raise RuntimeError(f"the mocked request is not $0.001: usage {usage}, LiteLLM's cost {reported!r}")
    return reported


async def _latency(with_callback: Proxy, without: Proxy, sizes: Sizes) -> dict[str, Any]:
    """Client-observed latency at concurrency 1 through both proxies, one request each in turn (the first of a
    pair alternating), keep-alive connections; after a warm-up."""
    samples: dict[str, list[float]] = {"with_callback": [], "without_callback": []}
    async with aiohttp.ClientSession() as a, aiohttp.ClientSession() as b:
        sides = (("with_callback", with_callback, a), ("without_callback", without, b))
        for i in range(sizes.warm_up + sizes.latency_requests):
            for name, proxy, http in sides if i % 2 else sides[::-1]:
                began = time.perf_counter()
                status, _, _, error = await chat(http, proxy, LATENCY_KEY, {"model": MODEL, **BODY})
                elapsed_ms = (time.perf_counter() - began) * 1000
                if status != 200:
                    raise RuntimeError(f"latency request answered {status}: {error}\n{proxy.tail()}")
                if i >= sizes.warm_up:
                    samples[name].append(elapsed_ms)
    out: dict[str, Any] = {"requests": sizes.latency_requests, "warm_up": sizes.warm_up}
    out |= {name: quantiles_ms(values) for name, values in samples.items()}
    for q in ("p50_ms", "p99_ms"):
        out[f"added_{q}"] = out["with_callback"][q] - out["without_callback"][q]
    return out


def _row(system: tuple[str, str], workers: int, concurrency: int, burst: Burst, exact: int) -> dict[str, Any]:
    return {
        "system": system[0],
        "budget": system[1],
        "workers": workers,
        "concurrency": concurrency,
        "admitted": burst.admitted,
        "ratio": burst.admitted / exact,
        "statuses": {str(s): n for s, n in sorted(burst.statuses.items())},
        "reported_cost_usd": str(burst.reported),
        "odd_answers": burst.odd,
        # Fewer than exact here is budget refused while it was still there (a later answer may use it after all).
        "admitted_before_first_refusal": burst.before_refusal,
        "requests_per_s": sum(burst.statuses.values()) / burst.elapsed_s,  # the pace, refusals included
    }


def _pair(env: dict[str, str], root: Path, sizes: Sizes, workers: int) -> tuple[Proxy, Proxy]:
    """Two proxies of one config, with and without budgetflow's callback line, started."""
    common: dict[str, Any] = {
        "models": _models(sizes),
        "keys": _keys(sizes),
        "workers": workers,
        "router_settings": ROUTER_SETTINGS,
        "general_settings": GENERAL_SETTINGS,
    }
    with_callback = Proxy(env, root / f"w{workers}-budgetflow", callback=True, **common).start()
    without = Proxy(env, root / f"w{workers}-litellm", callback=False, **common).start()
    return with_callback, without


# Per worker count: the pair of proxies, the cost check, the latency (one worker), then per concurrency the three
# cells in turn (budgetflow's on the proxy with the callback, LiteLLM's two on the one without).
async def _measure(env: dict[str, str], root: Path, sizes: Sizes) -> dict[str, Any]:
    exact = parse_usd(sizes.limit_usd) // PER_REQUEST_PICO
    rows: list[dict[str, Any]] = []
    latency: dict[str, Any] = {}
    reported = ""
    for w in sizes.workers:
        with_callback, without = _pair(env, root, sizes, w)
        try:
            async with aiohttp.ClientSession() as http:
                await with_callback.ready(http)
                await without.ready(http)
                reported = await _check_cost(without, http)
                await _check_cost(with_callback, http)
            if not latency:
                latency = await _latency(with_callback, without, sizes)
            for c in sizes.concurrency:
                ours = await _burst(with_callback, f"sk-bench-bf-w{w}-c{c}", MODEL, sizes.requests, c)
                rows.append(_row(BUDGETFLOW, w, c, ours, exact) | {"budget_id": _budget(w, c)})
                key = await _burst(without, f"sk-bench-kb-w{w}-c{c}", MODEL, sizes.requests, c)
                rows.append(_row(LITELLM_KEY, w, c, key, exact))
                deployment = await _burst(without, PLAIN_KEY, f"{MODEL}-dep-c{c}", sizes.requests, c)
                rows.append(_row(LITELLM_DEPLOYMENT, w, c, deployment, exact))
        finally:
            with_callback.stop()
            without.stop()
    rows.sort(key=lambda r: (SYSTEMS.index((r["system"], r["budget"])), r["workers"], r["concurrency"]))
    return {"litellm_reported_cost_usd": reported, "overshoot": rows, "latency": latency}


async def _settle(settings: Settings, topics: Topics, rows: list[dict[str, Any]]) -> None:
    """budgetflow's rows from its ledger once every admitted request settled; LiteLLM's from its reported cost."""
    await settle_cells(settings, topics, [r for r in rows if r["system"] == "budgetflow"], PER_REQUEST_PICO)
    for row in rows:
        if row["system"] != "budgetflow":
            row["spend_usd"] = format_usd(int(Decimal(row["reported_cost_usd"]) * PICO_PER_USD), 6)


def bench_litellm(quick: bool, bootstrap: str) -> dict[str, Any]:
    """The overshoot table and the callback's latency (module docstring); skipped without LiteLLM."""
    if not installed():
        return {"skipped": NOT_INSTALLED}
    from budgetflow.tokenizers import PriceTable

    sizes = QUICK if quick else FULL
    prefix = f"ll{uuid.uuid4().hex[:6]}."
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "prices.yaml").write_text(PRICES)
        env = bench_env(bootstrap, prefix, root, BUDGETFLOW_PRICING__FILE=str(root / "prices.yaml"))
        settings = settings_from_env(env)
        table = PriceTable.from_settings(settings.pricing)
        cost = table.cost("bench-model", provider="openai", input_tokens=10, output_tokens=20).pico_usd
        if cost != PER_REQUEST_PICO:
            raise RuntimeError(f"the bench's price table makes a mocked request {cost} pico-dollars, not $0.001")
        topics = Topics.from_settings(settings)
        asyncio.run(ensure_topics_now(settings, topics))
        workers = [WorkerProcess(role, env, root / f"{role}.log") for role in ("enrich", "aggregate")]
        try:

            async def run() -> dict[str, Any]:
                budgets = [_budget(w, c) for w in sizes.workers for c in sizes.concurrency]
                await cap_policies(settings, topics, root, budgets, sizes.limit_usd)
                measured = await _measure(env, root / "proxies", sizes)
                await _settle(settings, topics, measured["overshoot"])
                return measured

            measured = asyncio.run(run())
        finally:
            for worker in workers:
                worker.stop()
    return {
        "litellm_version": importlib.metadata.version("litellm"),
        "requests": sizes.requests,
        "limit_usd": sizes.limit_usd,
        "per_request_usd": format_usd(PER_REQUEST_PICO, 6),
        "exact": parse_usd(sizes.limit_usd) // PER_REQUEST_PICO,
        "budgetflow_cost_usd": format_usd(cost, 12),
        **measured,
    }
