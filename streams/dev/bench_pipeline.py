"""Benchmarks that need a broker: enrich and aggregate throughput, threshold-to-status latency, the publisher.

Each runs on topics of its own, on the local broker that `budgetflow bench`
starts (or on ``BUDGETFLOW_BENCH_BOOTSTRAP``), beside a baseline measured in
the same run.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from budgetflow.schemas.serde import dumps, loads
from budgetflow.schemas.settings import Settings
from budgetflow.streams.dev.bench_common import (
    aggregate_rate,
    bench_env,
    bench_settings,
    fill,
    ledger_entries,
    percentiles_us,
    quantiles_ms,
    raw_consume,
    sample_text,
    wait_heartbeats,
    worker_rate,
)
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now

__all__ = ["bench_aggregate", "bench_enrich", "bench_latency", "bench_publisher"]


def bench_aggregate(quick: bool, bootstrap: str) -> dict[str, Any]:
    """One aggregate worker vs a raw consumer on the same ledger, for many budgets and for one."""
    n = 4_000 if quick else 200_000
    results: dict[str, Any] = {"entries": n}
    with tempfile.TemporaryDirectory() as tmp:
        for label, budgets in (("1000_budgets", [f"team:{i}" for i in range(1000)]), ("one_budget", ["global"])):
            prefix = f"bench{uuid.uuid4().hex[:6]}."
            settings = bench_settings(bootstrap, prefix, Path(tmp) / label, heartbeat_s=1.0)
            topics = Topics.from_settings(settings)

            async def run(
                settings: Settings = settings, topics: Topics = topics, budgets: list[str] = budgets
            ) -> dict[str, float]:
                await ensure_topics_now(settings, topics)
                await fill(settings, topics.ledger.name, ledger_entries(n, budgets))
                raw = await raw_consume(settings, topics.ledger.name, n)
                ours = await aggregate_rate(settings, n)
                return {"raw_consumer_per_s": raw, "aggregate_per_s": ours, "ratio": ours / raw}

            results[label] = asyncio.run(run())
    return results


def bench_latency(quick: bool, bootstrap: str) -> dict[str, Any]:
    """From publishing the usage that crosses a threshold to its status on the topic, idle pipeline."""
    from budgetflow.streams.ops.policy_admin import apply_policy_file
    from budgetflow.streams.service.launch import WorkerProcess

    trials = 5 if quick else 60
    prefix = f"lat{uuid.uuid4().hex[:6]}."
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = bench_settings(bootstrap, prefix, root, heartbeat_s=0.5)
        topics = Topics.from_settings(settings)
        env = bench_env(bootstrap, prefix, root)
        budgets = [f"lat:{i}" for i in range(trials)]
        policy = root / "policies.yaml"
        entry = '  - id: "{}"\n    monthly_limit_usd: "1.00"\n    soft_limit_percent: 50\n'
        policy.write_text("budgets:\n" + "".join(entry.format(b) for b in budgets))

        async def prepare() -> None:
            await ensure_topics_now(settings, topics)
            await apply_policy_file(settings, topics.policies.name, policy, prune=False)

        asyncio.run(prepare())
        workers = [WorkerProcess(role, env, root / f"{role}.log") for role in ("enrich", "aggregate")]
        try:
            samples = asyncio.run(_crossings(settings, topics, budgets))
        finally:
            for worker in workers:
                worker.stop()
    return {"trials": trials, **quantiles_ms(samples)}


async def _crossings(settings: Settings, topics: Topics, budgets: list[str]) -> list[float]:
    options = client_options(settings.kafka)
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False)
    await consumer.start()
    producer = AIOKafkaProducer(**options, enable_idempotence=True, linger_ms=0)
    await producer.start()
    try:
        tp = TopicPartition(topics.status.name, 0)
        consumer.assign([tp])
        await wait_heartbeats(settings, topics)
        await consumer.seek_to_end(tp)
        samples = []
        for index, budget in enumerate(["lat:warm-up", *budgets]):
            now = datetime.now(UTC).isoformat()
            usage: dict[str, Any] = {
                "v": 1,
                "request_id": f"lat-{budget}",
                "request_occurred_at": now,
                "occurred_at": now,
                "budgets": [budget],
                "model": "gpt-4o",
                "provider": "openai",
                "backend": "cloud",
                "outcome": "completed",
                "input_tokens": 240_000,
                "output_tokens": 0,
            }  # 240,000 input tokens of gpt-4o: $0.60, over the soft limit of $0.50
            began = time.perf_counter()
            await producer.send_and_wait(topics.usage.name, key=f"lat-{budget}".encode(), value=dumps(usage))
            while True:
                batch = await consumer.getmany(tp, timeout_ms=5000)
                if not batch:
                    raise TimeoutError(f"no status for {budget} within 5 s")
                wanted = ("soft_limit",) if index else ("normal", "soft_limit", "hard_limit")
                if any(r.key == budget.encode() and loads(r.value)["status"] in wanted for r in batch[tp]):
                    if index:  # the first crossing only warms the pipeline up
                        samples.append((time.perf_counter() - began) * 1000)
                    break
            await asyncio.sleep(0.2)
        return samples
    finally:
        await producer.stop()
        await consumer.stop()


def bench_publisher(quick: bool, bootstrap: str) -> dict[str, Any]:
    """`publish_request` on the caller's side (validate, serialize, buffer) beside a bare queue put."""
    from budgetflow.streams.gateway.publisher import BudgetPublisher

    calls = 2_000 if quick else 20_000
    prefix = f"pub{uuid.uuid4().hex[:6]}."

    async def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            settings = bench_settings(bootstrap, prefix, Path(tmp))
            await ensure_topics_now(settings, Topics.from_settings(settings))
            async with BudgetPublisher(settings, buffer_max=calls * 2) as publisher:
                messages = [{"role": "user", "content": "Summarize the attached quarterly report. " * 20}]
                ours = []
                for i in range(calls):
                    began = time.perf_counter_ns()
                    await publisher.publish_request(
                        request_id=f"b-{i}",
                        model="gpt-4o",
                        provider="openai",
                        backend="cloud",
                        budgets=["team:a"],
                        messages=messages,
                        max_tokens=256,
                    )
                    ours.append(time.perf_counter_ns() - began)
                await publisher.flush()
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            base = []
            for _ in range(calls):
                began = time.perf_counter_ns()
                await queue.put(b"x")
                base.append(time.perf_counter_ns() - began)
            return {"calls": calls, "publish_request": percentiles_us(ours), "baseline": percentiles_us(base)}

    return asyncio.run(run())


def _chat_requests(n: int, seed: int = 3) -> list[dict[str, Any]]:
    """Realistic chat requests: a system prompt and a user message, mixed sizes averaging about 2 KB."""
    import random

    rng = random.Random(seed)
    now = datetime.now(UTC).isoformat()
    out = []
    for i in range(n):
        size = min(20_000, int(rng.lognormvariate(7.2, 0.9)))
        out.append(
            {
                "v": 1,
                "request_id": f"e{i}",
                "occurred_at": now,
                "budgets": [f"team:{i % 50}"],
                "model": rng.choice(["gpt-4o", "gpt-4o-mini", "gpt-4.1"]),
                "provider": "openai",
                "backend": "cloud",
                "max_tokens": 512,
                "messages": [
                    {"role": "system", "content": sample_text(rng, 200)},
                    {"role": "user", "content": sample_text(rng, size)},
                ],
            }
        )
    return out


def bench_enrich(quick: bool, bootstrap: str) -> dict[str, Any]:
    """The enrich worker (decode, count, price, one entry per budget, produce) vs raw tiktoken on the same texts."""
    from budgetflow.streams.enrich.enricher import Enricher
    from budgetflow.streams.enrich.worker import EnrichWorker
    from budgetflow.tokenizers import Estimator, PriceTable, TokenizerRegistry
    from budgetflow.tokenizers.encodings import get_encoding

    n = 1_000 if quick else 20_000
    requests = _chat_requests(n)
    mean_bytes = sum(sum(len(m["content"].encode()) for m in r["messages"]) for r in requests) / n
    encode = get_encoding("o200k_base").encode_ordinary
    for r in requests[:50]:
        encode(r["messages"][1]["content"])  # warm up
    began = time.perf_counter()
    for r in requests:
        for m in r["messages"]:
            encode(m["role"])
            encode(m["content"])
    raw_rate = n / (time.perf_counter() - began)
    prefix = f"enr{uuid.uuid4().hex[:6]}."

    async def run() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            settings = bench_settings(bootstrap, prefix, Path(tmp), metrics={"port": 0})
            topics = Topics.from_settings(settings)
            await ensure_topics_now(settings, topics)
            await fill(settings, topics.requests.name, [(r["request_id"], dumps(r)) for r in requests])
            estimator = Estimator(TokenizerRegistry.default(), PriceTable.default())
            return await worker_rate(EnrichWorker(settings, Enricher(estimator, topics), topics), n)

    rate = asyncio.run(run())
    return {
        "requests": n,
        "mean_bytes": mean_bytes,
        "enrich_per_s": rate,
        "raw_tiktoken_per_s": raw_rate,
        "ratio": rate / raw_rate,
    }
