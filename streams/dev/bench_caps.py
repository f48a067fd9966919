"""`budgetflow bench --only caps`: admission at a hard cap through the example gateway, 1, 2 and 4 gateway
processes at concurrency 1, 10 and 100 (issue #19's workload, made reproducible).

Per cell: a budget of its own with a ``block_all`` policy of $0.50 (applied through the policies topic), 2,000
chat requests at $0.001 each sent by ``concurrency`` clients round-robin over N ``examples/gateway.py``
processes, each of which admits on its own BudgetView (``view.admit(..., request=handle)``). The bench's price
table (a PRICING__FILE) prices the model at $0 input and $50 per million output tokens, and every request asks
``max_tokens: 20``, which the example gateway's fake model reports as its completion: the reservation and the
cost are both $0.001 (checked in process and on one answer of every gateway before the cells run). Requests ask
for no local fallback (``X-Local-Fallback: no``), so a soft limit keeps them on cloud at $0.001 rather than
shifting some to a free local model. Admitted means HTTP 200; exact is limit / per-request cost. After the cells,
the ledger's settled spend of each budget is read from the aggregate's state once every admitted request has
settled: exact when it is admitted x $0.001 with nothing reserved.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from budgetflow.schemas.money import format_usd, parse_usd
from budgetflow.schemas.settings import Settings, settings_from_env
from budgetflow.streams.dev.bench_common import bench_env, cap_policies, quantiles_ms, settle_cells
from budgetflow.streams.dev.litellm_proxy import spawn_proxy, stop_group
from budgetflow.streams.dev.localhost import free_port
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now
from budgetflow.streams.service.launch import WorkerProcess, log_tail

__all__ = ["bench_caps"]

# A checkout of budgetflow: the bench runs its example gateway.
GATEWAY = Path(__file__).resolve().parents[2] / "examples" / "gateway.py"


@dataclass(frozen=True)
class Sizes:
    requests: int
    limit_usd: str
    cells: tuple[Cell, ...]  # in the order they run


Cell = tuple[int, int, bool]  # (gateway processes, concurrency, leases)
FULL = Sizes(2_000, "0.50", tuple((g, c, leased) for leased in (False, True) for g in (1, 2, 4) for c in (1, 10, 100)))
QUICK = Sizes(60, "0.030", ((1, 1, False), (2, 10, False), (2, 10, True)))

PER_REQUEST_PICO = 10**9  # $0.001
MODEL = "caps-model"
PROVIDER = "openai"  # what the example gateway says a cloud model of this name is served by
MAX_TOKENS = 20  # the fake model answers this many completion tokens: 20 x $50 per million = $0.001
PRICES = f"""as_of: "2026-11-01"
models:
  - match: "{MODEL}"
    provider: {PROVIDER}
    input_usd_per_mtok: "0"
    output_usd_per_mtok: "50"
    source: "budgetflow bench caps: the example gateway's fake answer of {MAX_TOKENS} tokens costs $0.001"
"""
MESSAGES = [{"role": "user", "content": "hi"}]
BODY = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
ESTIMATE_HEADER = format_usd(PER_REQUEST_PICO, 6)  # X-Budget-Cost-Estimated of every request
CHECK_KEY = "sk-caps-check"
CHECK_BUDGET = "caps:check"


def _budget(cell: Cell) -> str:
    gateways, concurrency, leased = cell
    return f"caps:g{gateways}c{concurrency}{'l' if leased else ''}"


def _key(cell: Cell) -> str:
    gateways, concurrency, leased = cell
    return f"sk-caps-g{gateways}-c{concurrency}{'-l' if leased else ''}"


def _key_file(path: Path, sizes: Sizes) -> Path:
    """The gateways' key file: per cell a key charged to the cell's budget, and one for the cost check."""
    keys = {CHECK_KEY: CHECK_BUDGET} | {_key(cell): _budget(cell) for cell in sizes.cells}
    lines = ["keys:"]
    for i, (key, budget) in enumerate(keys.items()):
        digest = hashlib.sha256(key.encode()).hexdigest()
        lines.append(f'  - {{name: caps-{i}, sha256: "{digest}", budgets: ["{budget}"]}}')
    path.write_text("\n".join(lines) + "\n")
    return path


class _Gateway:
    """``python examples/gateway.py`` as a child process on a free port, with a data dir and a log of its own."""

    def __init__(self, env: dict[str, str], keys: Path, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log = root / "gateway.log"
        command = [sys.executable, str(GATEWAY), "--port", str(port), "--keys", str(keys)]
        # Started like a LiteLLM proxy: a process group of its own that dies with the bench, stopped by SIGTERM
        # first (the gateway then publishes what it still holds).
        self.proc = spawn_proxy(command, {**env, "BUDGETFLOW_DATA_DIR": str(root / "data")}, self.log)

    async def ready(self, http: aiohttp.ClientSession, timeout_s: float = 120) -> None:
        """Until ``/healthz`` answers (the gateway serves once its view has read the statuses)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the example gateway exited:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the example gateway did not answer in {timeout_s:.0f} s:\n{self.tail()}")
            try:
                async with http.get(f"{self.base}/healthz") as response:
                    if response.status == 200 and (await response.json())["ready"]:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_group(self.proc)

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log, lines)


async def _chat(http: aiohttp.ClientSession, base: str, key: str) -> tuple[int, dict[str, Any] | None, str]:
    """One chat request: its status, the usage answered (None when refused), and X-Budget-Cost-Estimated."""
    headers = {"Authorization": f"Bearer {key}", "X-Local-Fallback": "no"}
    async with http.post(f"{base}/v1/chat/completions", json=BODY, headers=headers) as response:
        body = await response.json(content_type=None)
        usage = body.get("usage") if response.status == 200 and isinstance(body, dict) else None
        return response.status, usage, response.headers.get("X-Budget-Cost-Estimated", "")


async def _check_cost(http: aiohttp.ClientSession, gateway: _Gateway, settings: Settings) -> dict[str, int]:
    """One request through the gateway: its answer costs $0.001 in the bench's price table and was estimated
    (reserved) at $0.001, or the bench is wrong. Returns the answer's tokens and their cost."""
    from budgetflow.tokenizers import PriceTable

    status, usage, estimated = await _chat(http, gateway.base, CHECK_KEY)
    if status != 200 or usage is None:
        raise RuntimeError(f"the example gateway answered {status}:\n{gateway.tail()}")
    tokens = {"prompt_tokens": int(usage["prompt_tokens"]), "completion_tokens": int(usage["completion_tokens"])}
    table = PriceTable.from_settings(settings.pricing)
    cost = table.cost(
        MODEL, provider=PROVIDER, input_tokens=tokens["prompt_tokens"], output_tokens=tokens["completion_tokens"]
    ).pico_usd
    if cost != PER_REQUEST_PICO or estimated != ESTIMATE_HEADER:
        raise RuntimeError(f"the bench's request is not $0.001: usage {usage} costs {cost} pico, estimated {estimated}")
    return tokens | {"cost_pico": cost}


@dataclass
class Burst:
    """What the clients of one cell saw."""

    statuses: Counter[int]
    odd: int = 0  # admitted answers not of MAX_TOKENS completion tokens estimated at $0.001
    elapsed_s: float = 0.0
    before_refusal: int | None = None  # answers admitted before the first 429 (None: nothing refused)
    waited_ms: dict[int, list[float]] = field(default_factory=dict)  # each answer's time, by status

    @property
    def admitted(self) -> int:
        return self.statuses[200]


async def _burst(gateways: list[_Gateway], key: str, n: int, concurrency: int) -> Burst:
    """``n`` requests by ``concurrency`` clients, request i to gateway i mod N."""
    burst = Burst(Counter())
    pending = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        began = time.perf_counter()

        async def client() -> None:
            for i in pending:  # one iterator for all clients: each request once
                sent = time.perf_counter()
                status, usage, estimated = await _chat(http, gateways[i % len(gateways)].base, key)
                burst.waited_ms.setdefault(status, []).append((time.perf_counter() - sent) * 1000)
                burst.statuses[status] += 1
                if status == 200:
                    completion = (usage or {}).get("completion_tokens")
                    burst.odd += completion != MAX_TOKENS or estimated != ESTIMATE_HEADER
                elif status == 429 and burst.before_refusal is None:
                    burst.before_refusal = burst.admitted

        await asyncio.gather(*(client() for _ in range(concurrency)))
        burst.elapsed_s = time.perf_counter() - began
    return burst


def _row(cell: Cell, burst: Burst, exact: int) -> dict[str, Any]:
    return {
        "gateways": cell[0],
        "concurrency": cell[1],
        "leases": cell[2],
        "budget_id": _budget(cell),
        "admitted": burst.admitted,
        "exact": exact,
        "ratio": burst.admitted / exact,
        "statuses": {str(s): n for s, n in sorted(burst.statuses.items())},
        "odd_answers": burst.odd,
        # Fewer than exact here is budget refused while it was still there (a later answer may use it after all).
        "admitted_before_first_429": burst.before_refusal,
        "requests_per_s": sum(burst.statuses.values()) / burst.elapsed_s,  # the pace, refusals included
        # The wait at the cap: how long an answer took, admitted and refused (a leased gateway may wait for grants).
        "answer_ms": {str(s): quantiles_ms(times) for s, times in sorted(burst.waited_ms.items())},
    }


async def _measure(env: dict[str, str], settings: Settings, keys: Path, root: Path, sizes: Sizes) -> dict[str, Any]:
    """Per gateway count, its gateways started and checked, then its cells in turn on them."""
    exact = parse_usd(sizes.limit_usd) // PER_REQUEST_PICO
    rows: list[dict[str, Any]] = []
    checked: dict[str, int] = {}
    # Each set of gateways once (a count, with or without leases), in the order of the cells.
    for n, leased in dict.fromkeys((g, leased) for g, _, leased in sizes.cells):
        gateways: list[_Gateway] = []
        try:
            flag = {"BUDGETFLOW_VIEW__LEASES": "true" if leased else "false"}
            for i in range(n):
                gateways.append(_Gateway({**env, **flag}, keys, root / f"g{n}-{i}{'l' if leased else ''}"))
            async with aiohttp.ClientSession() as http:
                for gateway in gateways:
                    await gateway.ready(http)
                for gateway in gateways:
                    checked = await _check_cost(http, gateway, settings)
            for cell in sizes.cells:
                if cell[0] == n and cell[2] == leased:
                    rows.append(_row(cell, await _burst(gateways, _key(cell), sizes.requests, cell[1]), exact))
        finally:
            for gateway in gateways:
                gateway.stop()
    cost = checked.pop("cost_pico")
    return {"fake_usage": checked, "budgetflow_cost_usd": format_usd(cost, 12), "cells": rows}


def _check_reservation(settings: Settings) -> int:
    """What enrich's estimator reserves for the bench's request (``max_tokens: 20`` at $0 input): $0.001, or the
    bench is wrong (the gateways' answers then confirm their usage costs as much)."""
    from budgetflow.streams.gateway.estimates import CostEstimates
    from budgetflow.streams.gateway.routing import Candidate

    estimates = CostEstimates(settings)
    ask = estimates.request(messages=MESSAGES, max_tokens=MAX_TOKENS)
    reserved = estimates.of(ask, Candidate(MODEL, "cloud", provider=PROVIDER))
    if reserved != PER_REQUEST_PICO:
        raise RuntimeError(f"the bench's request reserves {reserved} pico-dollars, not $0.001")
    return reserved


def bench_caps(quick: bool, bootstrap: str) -> dict[str, Any]:
    """Admitted / exact per cell and the ledger's settled spend (module docstring)."""
    if not GATEWAY.exists():
        return {"skipped": f"{GATEWAY} is not there (the bench runs the example gateway of a checkout)"}
    sizes = QUICK if quick else FULL
    prefix = f"caps{uuid.uuid4().hex[:6]}."
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "prices.yaml").write_text(PRICES)
        env = bench_env(bootstrap, prefix, root, BUDGETFLOW_PRICING__FILE=str(root / "prices.yaml"))
        settings = settings_from_env(env)
        reserved = _check_reservation(settings)
        keys = _key_file(root / "keys.yaml", sizes)
        topics = Topics.from_settings(settings)
        asyncio.run(ensure_topics_now(settings, topics))
        workers = [WorkerProcess(role, env, root / f"{role}.log") for role in ("enrich", "aggregate")]
        try:

            async def run() -> dict[str, Any]:
                await cap_policies(settings, topics, root, [_budget(cell) for cell in sizes.cells], sizes.limit_usd)
                measured = await _measure(env, settings, keys, root / "gateways", sizes)
                await settle_cells(settings, topics, measured["cells"], PER_REQUEST_PICO)
                return measured

            measured = asyncio.run(run())
        finally:
            for worker in workers:
                worker.stop()
    return {
        "requests": sizes.requests,
        "limit_usd": sizes.limit_usd,
        "per_request_usd": format_usd(PER_REQUEST_PICO, 6),
        "exact": parse_usd(sizes.limit_usd) // PER_REQUEST_PICO,
        "reservation_usd": format_usd(reserved, 12),
        "hard_limit_action": "block_all",
        **measured,
    }
