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

__all__ = ["SECTIONS", "run_bench", "sample_text"]

_WORDS = (
    "the budget model request token price cloud local router gateway limit spend month usage cache reasoning "
    "answer question summarize explain code function return value error retry latency stream kafka partition "
    "offset ledger status policy team project customer invoice report table row column schema json field"
).split()
_CODE = [
    "def handler(event):\n    return {'ok': True}\n",
    "for (let i = 0; i < n; i++) { total += a[i]; }\n",
    "SELECT id, sum(cost) FROM ledger GROUP BY id;\n",
    'if err != nil {\n\treturn fmt.Errorf("x: %w", err)\n}\n',
]
_OTHER = [
    "Grüße aus München. ",
    "日本語の文章も少し。",
    "¿Qué tal? ",
    "Привет, мир. ",
    "emoji 🚀✨ ",
    "42 3.14159 2026-11-29 ",
]


def sample_text(rng: random.Random, n_bytes: int) -> str:
    """Chat-like text of about ``n_bytes`` UTF-8 bytes: prose, some code, numbers, other scripts."""
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        roll = rng.random()
        if roll < 0.08:
            piece = rng.choice(_CODE)
        elif roll < 0.14:
            piece = rng.choice(_OTHER)
        else:
            piece = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))).capitalize() + ". "
        parts.append(piece)
        size += len(piece.encode())
    return "".join(parts).encode()[:n_bytes].decode("utf-8", "ignore")


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    return {"p50_us": pick(0.50), "p95_us": pick(0.95), "p99_us": pick(0.99)}


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
            row[name] = {"tokens_per_s": tokens / total_s, **_percentiles(samples)}
        row["overhead_percent"] = (sum(timings["budgetflow"]) / sum(timings["tiktoken"]) - 1) * 100
        results[f"{size}B"] = row
    return results


def _kind_text(rng: random.Random, kind: str, n_bytes: int) -> str:
    pool = {"prose": None, "code": _CODE, "other_scripts": _OTHER}.get(kind)
    if kind == "mixed":
        return sample_text(rng, n_bytes)
    parts: list[str] = []
    while sum(len(p.encode()) for p in parts) < n_bytes:
        if pool is None:
            parts.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))).capitalize() + ". ")
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


def bench_routing(quick: bool) -> dict[str, Any]:
    """BudgetView memory at 100,000 budgets, and `decide` beside a trivial baseline, per call."""
    import gc
    import hashlib
    import tracemalloc

    from budgetflow.schemas.events import BudgetStatus
    from budgetflow.schemas.settings import Settings
    from budgetflow.streams.gateway.routing import Candidate
    from budgetflow.streams.gateway.view import BudgetView

    budgets = 2_000 if quick else 100_000
    view = BudgetView(Settings())
    now = datetime.now(UTC)
    period = f"{now.year:04d}-{now.month:02d}"
    from budgetflow.streams.rules.clock import next_month_start

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
    rss_after = _rss_bytes()
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
        "budgets": budgets,
        "view_traced_bytes": traced,
        "view_rss_bytes": rss_after - rss_before,
        "bytes_per_budget": traced / budgets,
        "decide": _percentiles(ours),
        "baseline": _percentiles(base),
    }


SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "tokenizers": bench_tokenizers,
    "heuristic_error": bench_heuristic_error,
    "routing": bench_routing,
}
# Sections that need a broker get its bootstrap address as a second argument.
KAFKA_SECTIONS = ("enrich", "aggregate", "latency", "load", "recovery", "publisher")


def run_bench(only: list[str] | None, quick: bool, out: Path) -> dict[str, Any]:
    """Run the chosen sections; write the JSON; return the results."""
    import logging

    from budgetflow.streams.dev import bench_load, bench_pipeline

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its retries during start-up are not results

    known = [*SECTIONS, *KAFKA_SECTIONS]
    chosen = only or known
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
            if name in KAFKA_SECTIONS:
                if bootstrap is None:
                    bootstrap = stack.enter_context(bench_pipeline.bench_kafka(out.parent))
                section = {
                    "aggregate": bench_pipeline.bench_aggregate,
                    "latency": bench_pipeline.bench_latency,
                    "publisher": bench_pipeline.bench_publisher,
                    "enrich": bench_pipeline.bench_enrich,
                    "load": bench_load.bench_load,
                    "recovery": bench_load.bench_recovery,
                }[name]
                results["sections"][name] = section(quick, bootstrap)
            else:
                results["sections"][name] = SECTIONS[name](quick)
            results["sections"][name]["elapsed_s"] = round(time.monotonic() - began, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(dumps(results))
    return results


def render(results: dict[str, Any]) -> str:
    """A readable table of the results (markdown)."""
    lines = [f"budgetflow bench, {results['date']}{' (quick)' if results['quick'] else ''}", ""]
    sections = results["sections"]
    if "tokenizers" in sections:
        lines += [
            "| prompt | tokens/req | budgetflow tok/s | tiktoken tok/s | budgetflow p50/p95/p99 µs | "
            "tiktoken p50/p95/p99 µs | overhead |",
            "|---|---|---|---|---|---|---|",
        ]
        for size, row in sections["tokenizers"].items():
            if size == "elapsed_s":
                continue
            ours, raw = row["budgetflow"], row["tiktoken"]
            lines.append(
                f"| {size} | {row['tokens_per_request']:.0f} | {ours['tokens_per_s']:,.0f} "
                f"| {raw['tokens_per_s']:,.0f} "
                f"| {ours['p50_us']:.0f}/{ours['p95_us']:.0f}/{ours['p99_us']:.0f} "
                f"| {raw['p50_us']:.0f}/{raw['p95_us']:.0f}/{raw['p99_us']:.0f} | {row['overhead_percent']:+.1f} % |"
            )
        lines.append("")
    if "heuristic_error" in sections:
        section = sections["heuristic_error"]
        lines += [
            f"heuristic vs exact, {section['texts_per_kind']} texts per kind (error %, + = overestimate)",
            "",
            "| text / encoding | mean | p5 | p50 | p95 | min | max | underestimates |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, e in section.items():
            if not isinstance(e, dict):
                continue
            lines.append(
                f"| {name} | {e['mean_percent']:+.1f} | {e['p5_percent']:+.1f} | {e['p50_percent']:+.1f} "
                f"| {e['p95_percent']:+.1f} | {e['min_percent']:+.1f} | {e['max_percent']:+.1f} "
                f"| {e['underestimates_percent']:.1f} % |"
            )
    if "enrich" in sections:
        row = sections["enrich"]
        lines += [
            "",
            f"enrich, {row['requests']:,} chat requests (mean {row['mean_bytes']:,.0f} B), one worker: "
            f"{row['enrich_per_s']:,.0f} requests/s; raw tiktoken on the same texts in one process: "
            f"{row['raw_tiktoken_per_s']:,.0f}/s; ratio {row['ratio']:.2f}",
        ]
    if "aggregate" in sections:
        section = sections["aggregate"]
        lines += [
            "",
            f"aggregate, {section['entries']:,} ledger entries, one worker",
            "",
            "| budgets | aggregate entries/s | raw consumer entries/s | ratio |",
            "|---|---|---|---|",
        ]
        for label in ("1000_budgets", "one_budget"):
            row = section[label]
            name = label.replace("_", " ")
            lines.append(
                f"| {name} | {row['aggregate_per_s']:,.0f} | {row['raw_consumer_per_s']:,.0f} | {row['ratio']:.2f} |"
            )
    if "latency" in sections:
        row = sections["latency"]
        lines += [
            "",
            f"threshold crossing to status on the topic, idle, {row['trials']} trials: "
            f"p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
            f"max {row['max_ms']:.0f} ms",
        ]
    if "load" in sections:
        row = sections["load"]
        q = row["latency"]
        lines += [
            "",
            f"under {row['achieved_per_s']:,.0f} usage events/s: threshold crossing to status on the topic "
            f"p50 {q['p50_ms']:.0f} ms, p95 {q['p95_ms']:.0f} ms, p99 {q['p99_ms']:.0f} ms ({row['trials']} "
            "trials)",
        ]
        over = row["overshoot"]
        for mode in ("bounded", "admitted"):
            o = over[mode]
            lines.append(
                f"overshoot at {row['rate_per_s']:,.0f} requests/s on a $1 cap, "
                f"{'with' if mode == 'admitted' else 'without'} view.admit: ${o['overshoot_usd']:.4f} "
                f"({o['overshoot_requests']:.1f} requests of ${over['request_cost_usd']:.4f})"
            )
    if "recovery" in sections:
        row = sections["recovery"]
        lines += [
            "",
            f"aggregate with {row['budgets']:,} budgets, stop to ready: {row['ready_rocksdb_s']:.1f} s "
            f"on its RocksDB store, {row['ready_from_changelog_s']:.1f} s from the changelog "
            f"({row['changelog_records']:,} records), {row['ready_empty_state_s']:.1f} s with no state; "
            f"RSS {row['rss_loaded_bytes'] / 2**20:.0f} MiB ({row['rss_bytes_per_budget']:.0f} B per budget), "
            f"store {row['store_bytes_per_budget']:.0f} B per budget",
        ]
    if "routing" in sections:
        row = sections["routing"]
        mib = row["view_traced_bytes"] / 2**20
        lines += [
            "",
            f"BudgetView with {row['budgets']:,} budgets: {mib:.1f} MiB allocated "
            f"({row['bytes_per_budget']:.0f} B per budget), RSS +{row['view_rss_bytes'] / 2**20:.1f} MiB",
            "",
            "| call | p50 µs | p95 µs | p99 µs |",
            "|---|---|---|---|",
            _row("view.decide (2 budgets + global)", row["decide"]),
            _row("baseline: 3 dict lookups + SHA-256", row["baseline"]),
        ]
    if "publisher" in sections:
        row = sections["publisher"]
        lines += [
            "",
            f"publisher, {row['calls']:,} calls, caller's side",
            "",
            "| call | p50 µs | p95 µs | p99 µs |",
            "|---|---|---|---|",
            _row("publish_request (validate, serialize, buffer)", row["publish_request"]),
            _row("baseline: asyncio.Queue.put", row["baseline"]),
        ]
    return "\n".join(lines)


def _row(name: str, p: dict[str, float]) -> str:
    return f"| {name} | {p['p50_us']:.1f} | {p['p95_us']:.1f} | {p['p99_us']:.1f} |"
