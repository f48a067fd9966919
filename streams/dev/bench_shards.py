"""`budgetflow bench --only shards`: one hot budget's entries/s unsharded, sharded on one worker and on two, with
each worker's CPU, and the status latency the merge adds; all in one run, on the bench's broker.

Each cell has topics of its own (eight ledger partitions), fills its ledger with the same number of entries (a
reserve and its settle per request) for one budget, then starts its aggregate workers as child processes and
times them until the group's committed offsets reach the end of every partition
(partial entries included: the sharded cells also apply the shards' sums at home), counting from the moment all
its workers are in the group and committing, so the first joins' rebalance is left out. A worker's CPU is its
process's user + system time over that span, read from ``/proc``. Then, with the workers still up, single
entries that each move the budget by one step are written to the ledger one at a time, and the time until a
status says their spend is the latency (unsharded: entry, worker, status; sharded: entry, shard's worker,
partial, home's worker, status).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from budgetflow.schemas.events import LedgerEntry, entry_id, period_of
from budgetflow.schemas.money import parse_usd
from budgetflow.schemas.serde import dumps, loads
from budgetflow.schemas.settings import Settings
from budgetflow.streams.dev.bench_common import (
    GroupOffsets,
    bench_env,
    bench_settings,
    fill,
    ledger_entries,
    quantiles_ms,
)
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now, partition_for
from budgetflow.streams.service.launch import WorkerProcess

__all__ = ["bench_shards"]

HOT = "hot"
SHARDS = 8
LIMIT_USD = "1000"
STEP_PICO = 10 * 10**12  # $10: one utilization step (1 %) of the limit, so every trial entry publishes a status


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drain(settings: Settings, topics: Topics, workers: list[WorkerProcess], home: int) -> dict[str, Any]:
    """Time the workers from the moment all of them are in the group and committing (what they applied before
    is left out: the first joins rebalance) until they have committed every entry of the fill and then the
    partials those entries sent home (ticks written meanwhile are not waited for)."""
    began: tuple[float, int, list[float]] | None = None  # (perf_counter, entries committed, CPU s) at the start
    first = (time.perf_counter(), 0, [_cpu_s(w.proc.pid) for w in workers])  # the same as the workers start
    filled: dict[int, int] | None = None
    target: int | None = None  # the home partition's end once every filled entry was committed
    deadline = time.monotonic() + 600
    async with GroupOffsets(settings, f"{settings.topics.prefix}aggregate", topics.ledger.name) as progress:
        while time.monotonic() < deadline:
            if not all(w.alive for w in workers):
                raise RuntimeError(f"an aggregate worker exited (log {workers[0].log.parent})")
            ends = await progress.ends()
            done = {p: max(0, o) for p, o in (await progress.committed()).items()}
            done = {p: done.get(p, 0) for p in ends}
            now = time.perf_counter()
            filled = filled or ends
            applied = sum(min(done[p], filled[p]) for p in filled)
            if began is None and 0 < applied < sum(filled.values()) and await progress.members() == len(workers):
                began = (now, applied, [_cpu_s(w.proc.pid) for w in workers])
            if target is None and applied == sum(filled.values()):
                target = ends[home]  # the shards committed after sending their partials: all are in
            if target is not None and done[home] >= target:
                start = began or first  # done before the group was stable (small sizes): from the start
                wall = max(now - start[0], 1e-3)
                cpu = [_cpu_s(w.proc.pid) - c for w, c in zip(workers, start[2], strict=True)]
                return {
                    "entries_per_s": (applied - start[1]) / wall,
                    "timed_entries": applied - start[1],
                    "worker_cpu_percent": [round(c / wall * 100, 1) for c in cpu],
                }
            await asyncio.sleep(0.05)
    raise TimeoutError("the aggregate did not commit the ledger within 600 s")


def _entry(account: str, request_id: str, pico: int) -> bytes:
    now = datetime.now(UTC)
    return dumps(
        LedgerEntry(
            entry_id=entry_id(request_id, 0, "settle", account),
            budget_id=account,
            request_id=request_id,
            kind="settle",
            period=period_of(now),
            amount_pico_usd=pico,
            occurred_at=now,
            ttl_s=3600,
        )
    )


async def _latency(settings: Settings, topics: Topics, shards: int, trials: int) -> list[float]:
    """Milliseconds from a ledger entry of one step to the status that says it, one entry at a time."""
    options = client_options(settings.kafka)
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False)
    await consumer.start()
    producer = AIOKafkaProducer(**options, enable_idempotence=True, linger_ms=0)
    await producer.start()
    try:
        parts = [TopicPartition(topics.status.name, p) for p in range(topics.status.partitions)]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        spend = None
        samples = []
        for trial in range(trials + 1):
            account = HOT if shards == 1 else f"{HOT}#{trial % shards}"
            began = time.perf_counter()
            key = account.encode()
            await producer.send_and_wait(
                topics.ledger.name, key=key, value=_entry(account, f"lat{trial}", STEP_PICO), partition=None
            )
            while True:
                batch = await consumer.getmany(timeout_ms=10_000)
                if not batch:
                    raise TimeoutError(f"no status within 10 s of trial {trial}")
                said = [loads(r.value) for rs in batch.values() for r in rs if r.key == HOT.encode()]
                reached = [parse_usd(s["spend_usd"]) for s in said]
                if reached and (spend is None or max(reached) >= spend + STEP_PICO):
                    spend = max(reached)
                    break
            if trial:  # the first one warms the path up
                samples.append((time.perf_counter() - began) * 1000)
        return samples
    finally:
        await producer.stop()
        await consumer.stop()


async def _cell(bootstrap: str, root: Path, n: int, shards: int, workers: int, trials: int) -> dict[str, Any]:
    from budgetflow.streams.ops.policy_admin import apply_policy_file

    prefix = f"shd{uuid.uuid4().hex[:6]}."
    settings = bench_settings(bootstrap, prefix, root)
    topics = Topics.from_settings(settings)
    await ensure_topics_now(settings, topics)
    policy = root / "policies.yaml"
    policy.write_text(f'budgets:\n  - id: "{HOT}"\n    monthly_limit_usd: "{LIMIT_USD}"\n    shards: {shards}\n')
    await apply_policy_file(settings, topics.policies.name, policy, prune=False)
    accounts = [HOT] if shards == 1 else [f"{HOT}#{k}" for k in range(shards)]
    await fill(settings, topics.ledger.name, ledger_entries(n, accounts))
    env = bench_env(bootstrap, prefix, root)
    procs = [WorkerProcess("aggregate", {**env, "BUDGETFLOW_DATA_DIR": str(root / f"w{i}")}, root / f"w{i}.log")
             for i in range(workers)]  # fmt: skip
    try:
        drained = await _drain(settings, topics, procs, partition_for(HOT, topics.ledger.partitions))
        latency = await _latency(settings, topics, shards, trials)
    finally:
        for proc in procs:
            proc.stop()
    return {
        **drained,
        "partitions": sorted({partition_for(a, topics.ledger.partitions) for a in accounts}),
        "status_latency_ms": quantiles_ms(latency),
    }


def bench_shards(quick: bool, bootstrap: str) -> dict[str, Any]:
    """One hot budget: unsharded on one worker (the baseline), 8 shards on one worker, 8 shards on two."""
    n = 4_000 if quick else 200_000
    trials = 3 if quick else 30
    cells = {"unsharded_1_worker": (1, 1), "sharded_1_worker": (SHARDS, 1), "sharded_2_workers": (SHARDS, 2)}
    out: dict[str, Any] = {"entries": n, "shards": SHARDS, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (shards, workers) in cells.items():
            root = Path(tmp) / name
            root.mkdir()
            out[name] = asyncio.run(_cell(bootstrap, root, n, shards, workers, trials))
    base = out["unsharded_1_worker"]["entries_per_s"]
    for name in cells:
        out[name]["ratio"] = out[name]["entries_per_s"] / base
    return out
