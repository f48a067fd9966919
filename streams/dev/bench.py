"""`budgetflow bench`: every figure beside its baseline, measured in the same run.

These machines are noisy; only ratios travel. Results go to one JSON file and
a readable table. ``--quick`` runs tiny sizes so CI keeps the code from rotting
without asserting any timing.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from budgetflow.schemas.serde import dumps
from budgetflow.streams.dev.bench_common import CODE, OTHER, WORDS, bench_kafka, percentiles_us, sample_text

__all__ = ["KAFKA_SECTIONS", "OPT_IN", "SECTIONS", "run_bench"]


def bench_tokenizers(quick: bool) -> dict[str, Any]:
    """Registry count_chat vs raw tiktoken on the same chat requests, per prompt size."""
    from budgetflow.tokenizers.encodings import get_encoding
    from budgetflow.tokenizers.registry import TokenizerRegistry

    registry = TokenizerRegistry.default()
    encoding = get_encoding("o200k_base")
    raw_encode = encoding.encode_ordinary
    rng = random.Random(7)
    rounds = 40 if quick else 2000
    results: dict[str, Any] = {}
    for size in (200, 2_000, 20_000):
        n = max(5, rounds // (1 if size < 20_000 else 5))
        requests = [
            [
                {"role": "system", "content": sample_text(rng, size // 10)},
                {"role": "user", "content": sample_text(rng, size - size // 10)},
            ]
            for _ in range(n)
        ]

        def ours(messages: list[dict[str, str]]) -> int:
            return registry.count_chat("gpt-4o", messages).tokens

        def raw(messages: list[dict[str, str]]) -> int:
            # The same work with tiktoken alone: every role and content, plus the chat overheads.
            return 3 + sum(3 + len(raw_encode(m["role"])) + len(raw_encode(m["content"])) for m in messages)

        for messages in requests[:5]:  # warm-up, and a check that both count the same
            assert ours(messages) == raw(messages)
        timings: dict[str, list[int]] = {"budgetflow": [], "tiktoken": []}
        tokens = 0
        sides = (("budgetflow", ours), ("tiktoken", raw))
        for index, messages in enumerate(requests):
            # Interleaved, first one side then the other, so that neither drift on a
            # noisy machine nor a warm cache favours one of them.
            for name, fn in sides if index % 2 else sides[::-1]:
                began = time.perf_counter_ns()
                count = fn(messages)
                timings[name].append(time.perf_counter_ns() - began)
            tokens += count
        row: dict[str, Any] = {"requests": n, "tokens_per_request": tokens / n}
        for name, samples in timings.items():
            total_s = sum(samples) / 1e9
            row[name] = {"tokens_per_s": tokens / total_s, **percentiles_us(samples)}
        row["overhead_percent"] = (sum(timings["budgetflow"]) / sum(timings["tiktoken"]) - 1) * 100
        results[f"{size}B"] = row
    return results


def _kind_text(rng: random.Random, kind: str, n_bytes: int) -> str:
    pool = {"prose": None, "code": CODE, "other_scripts": OTHER}.get(kind)
    if kind == "mixed":
        return sample_text(rng, n_bytes)
    parts: list[str] = []
    while sum(len(p.encode()) for p in parts) < n_bytes:
        if pool is None:
            parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + ". ")
        else:
            parts.append(rng.choice(pool))
    return "".join(parts).encode()[:n_bytes].decode("utf-8", "ignore")


def bench_heuristic_error(quick: bool) -> dict[str, Any]:
    """How far the byte heuristic is from o200k_base and cl100k_base on the same texts, by kind of text."""
    from budgetflow.tokenizers.encodings import get_encoding
    from budgetflow.tokenizers.registry import HEURISTIC

    rng = random.Random(11)
    per_kind = 10 if quick else 200
    out: dict[str, Any] = {"texts_per_kind": per_kind}
    for kind in ("mixed", "prose", "code", "other_scripts"):
        texts = [_kind_text(rng, kind, rng.choice((200, 2_000, 20_000))) for _ in range(per_kind)]
        for name in ("o200k_base", "cl100k_base"):
            encoding = get_encoding(name)
            errors = sorted(
                (HEURISTIC.count(t) - exact) / exact * 100 for t in texts if (exact := len(encoding.encode_ordinary(t)))
            )
            quantiles = statistics.quantiles(errors, n=20)
            out[f"{kind}/{name}"] = {
                "mean_percent": statistics.fmean(errors),
                "p5_percent": quantiles[0],
                "p50_percent": statistics.median(errors),
                "p95_percent": quantiles[-1],
                "min_percent": errors[0],
                "max_percent": errors[-1],
                "underestimates_percent": sum(e < 0 for e in errors) / len(errors) * 100,
            }
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _filled_view(budgets: int, now: datetime) -> tuple[Any, int, int]:
    """A BudgetView holding ``budgets`` statuses; the bytes Python allocated for them and the RSS they added."""
    import gc
    import tracemalloc

    from budgetflow.schemas.events import BudgetStatus
    from budgetflow.schemas.periods import next_month_start
    from budgetflow.schemas.settings import Settings
    from budgetflow.streams.gateway.view import BudgetView

    view = BudgetView(Settings())
    period = f"{now.year:04d}-{now.month:02d}"
    reset = next_month_start(period)
    gc.collect()
    rss_before = _rss_bytes()
    tracemalloc.start()
    for i in range(budgets):
        spend = (i * 7919) % (100 * 10**12)
        view.apply_status(
            BudgetStatus(
                budget_id=f"team:{i}",
                period=period,
                status="soft_limit" if spend > 75 * 10**12 else "normal",
                spend_usd=spend,
                settled_usd=spend,
                reserved_usd=0,
                limit_usd=100 * 10**12,
                remaining_usd=100 * 10**12 - spend,
                utilization_percent=spend / 10**12,
                soft_limit_percent=75,
                hard_limit_action="block_cloud",
                as_of=now,
                next_reset=reset,
                reason="step",
                partition=i % 8,
                seq=i,
            )
        )
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gc.collect()
    return view, traced, _rss_bytes() - rss_before


def bench_routing(quick: bool) -> dict[str, Any]:
    """BudgetView memory at 100,000 budgets, and `decide` beside a trivial baseline, per call."""
    import hashlib

    from budgetflow.streams.gateway.routing import Candidate

    budgets = 2_000 if quick else 100_000
    now = datetime.now(UTC)
    view, traced, rss = _filled_view(budgets, now)
    candidates = [Candidate("gpt-4o", "cloud", 1.0), Candidate("llama3.1:8b", "local", 0.5)]
    rng = random.Random(5)
    calls = 2_000 if quick else 50_000
    names = [(f"req-{i}", [f"team:{rng.randrange(budgets)}", f"team:{rng.randrange(budgets)}"]) for i in range(calls)]
    ours, base = [], []
    statuses = view._statuses

    def trivial(request_id: str, wanted: list[str]) -> bool:
        # The least a router does: look its budgets up and hash the request id.
        found = [statuses.get(b) for b in wanted]
        return hashlib.sha256(request_id.encode()).digest()[0] < 128 and all(f is not None for f in found)

    for request_id, wanted in names:
        began = time.perf_counter_ns()
        view.decide(request_id, wanted, candidates, now=now)
        ours.append(time.perf_counter_ns() - began)
        began = time.perf_counter_ns()
        trivial(request_id, wanted)
        base.append(time.perf_counter_ns() - began)
    return {
        **_leased_decide(view, names, candidates, now),
        "budgets": budgets,
        "view_traced_bytes": traced,
        "view_rss_bytes": rss,
        "bytes_per_budget": traced / budgets,
        "decide": percentiles_us(ours),
        "baseline": percentiles_us(base),
    }


def _leased_decide(
    view: Any, names: list[tuple[str, list[str]]], candidates: list[Any], now: datetime
) -> dict[str, Any]:
    """A cloud admission on leased budgets: ``decide`` then ``lease`` with leases that cover it (no ask, no wait),
    beside the ``decide`` of the same calls alone (the same view, the same policies followed)."""
    import asyncio
    from datetime import timedelta

    from budgetflow.schemas.events import LeaseAsk, LeaseGrant, LeaseTag
    from budgetflow.schemas.policy import BudgetPolicy
    from budgetflow.streams.gateway.leasebook import LeaseBook

    leased = sorted({budget for _, wanted in names for budget in wanted})
    policy = {"monthly_limit_usd": "100", "hard_limit_action": "block_cloud"}
    policies = {b: BudgetPolicy.model_validate({"id": b, **policy}) for b in leased}
    view.use_policies(lambda: policies)

    async def unsent(ask: LeaseAsk) -> None:
        raise AssertionError(f"a covering lease asked for more: {ask}")

    book = LeaseBook("bench", unsent, ttl_s=3600, margin_s=2, horizon_s=1, wait_ms=50, minimum_pico=10**10)
    period = f"{now.year:04d}-{now.month:02d}"
    expiry = datetime.now(UTC) + timedelta(hours=1)
    for budget in leased:  # far more than the calls take: every call is covered
        book.granted(LeaseGrant(budget_id=budget, period=period, router="bench", epoch=0, granted_usd=10**18,
                                used_usd=0, expires_at=expiry, asks=0, as_of=now))  # fmt: skip
    view.lease_book = book

    async def calls() -> tuple[list[int], list[int]]:
        both, alone = [], []
        for request_id, wanted in names:
            began = time.perf_counter_ns()
            view.decide(request_id, wanted, candidates, now=now)
            decided = time.perf_counter_ns()
            tag = await view.lease(wanted, 5 * 10**9)
            both.append(time.perf_counter_ns() - began)
            alone.append(decided - began)
            assert isinstance(tag, LeaseTag), tag
        return both, alone

    both, alone = asyncio.run(calls())
    view.lease_book = None
    return {"decide_lease": percentiles_us(both), "decide_with_policies": percentiles_us(alone)}


SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "tokenizers": bench_tokenizers,
    "heuristic_error": bench_heuristic_error,
    "routing": bench_routing,
}
# Sections that need a broker get its bootstrap address as a second argument.
# "cluster" starts a three-node cluster of its own instead (it kills nodes): it never gets the bench broker.
KAFKA_SECTIONS = (
    "enrich", "aggregate", "shards", "latency", "load", "recovery", "publisher", "litellm", "caps", "cluster", "faust"
)  # fmt: skip
# Sections that run only when named with --only: they need an optional extra, or three JVMs, and take minutes.
OPT_IN = ("litellm", "caps", "cluster", "faust")


def _kafka_section(name: str) -> Callable[[bool, str], dict[str, Any]]:
    """The function of a section that needs a broker (their modules load aiokafka: imported when one runs)."""
    from budgetflow.streams.dev import (
        bench_caps,
        bench_faust,
        bench_litellm,
        bench_load,
        bench_pipeline,
        bench_shards,
    )

    return {
        "litellm": bench_litellm.bench_litellm,
        "caps": bench_caps.bench_caps,
        "faust": bench_faust.bench_faust,
        "aggregate": bench_pipeline.bench_aggregate,
        "shards": bench_shards.bench_shards,
        "latency": bench_pipeline.bench_latency,
        "publisher": bench_pipeline.bench_publisher,
        "enrich": bench_pipeline.bench_enrich,
        "load": bench_load.bench_load,
        "recovery": bench_load.bench_recovery,
    }[name]


def run_bench(only: list[str] | None, quick: bool, out: Path) -> dict[str, Any]:
    """Run the chosen sections; write the JSON; return the results."""
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its retries during start-up are not results

    known = [*SECTIONS, *KAFKA_SECTIONS]
    chosen = only or [name for name in known if name not in OPT_IN]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ValueError(f"unknown bench section {unknown[0]!r}; known: {', '.join(known)}")
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "sections": {},
    }
    with contextlib.ExitStack() as stack:
        bootstrap: str | None = None
        for name in chosen:
            began = time.monotonic()
            if name == "cluster":
                from budgetflow.streams.dev.bench_cluster import bench_cluster

                results["sections"][name] = bench_cluster(quick, out.parent)
            elif name in KAFKA_SECTIONS:
                if bootstrap is None:
                    bootstrap = stack.enter_context(bench_kafka(out.parent))
                results["sections"][name] = _kafka_section(name)(quick, bootstrap)
            else:
                results["sections"][name] = SECTIONS[name](quick)
            results["sections"][name]["elapsed_s"] = round(time.monotonic() - began, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(dumps(results))
    return results
