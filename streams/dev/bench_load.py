"""Benchmarks under load: latency at 1,000 requests/s, overshoot of a cap, recovery of 100,000 budgets.

Workers run as child processes against the bench's broker, on topics of
their own; figures are printed beside what they are measured against.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from budgetflow.schemas.serde import dumps, loads
from budgetflow.schemas.settings import Settings, settings_from_env
from budgetflow.streams.dev.bench_common import bench_env, fill, ledger_entries, quantiles_ms, wait_heartbeats
from budgetflow.streams.dev.localhost import free_port
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now
from budgetflow.streams.service.launch import WorkerProcess

if TYPE_CHECKING:
    from budgetflow.streams.gateway.publisher import BudgetPublisher
    from budgetflow.streams.gateway.view import BudgetView

__all__ = ["bench_load", "bench_recovery"]

# gpt-4o-mini at $0.15 / $0.60 per million tokens: 1,000 input and 200 output tokens cost $0.00027.
LOAD_USAGE = {
    "model": "gpt-4o-mini",
    "provider": "openai",
    "backend": "cloud",
    "input_tokens": 1000,
    "output_tokens": 200,
}
LOAD_COST_PICO = 1000 * 150_000 + 200 * 600_000


async def _policies(settings: Settings, topics: Topics, root: Path, lines: list[str]) -> None:
    from budgetflow.streams.ops.policy_admin import apply_policy_file

    path = root / "policies.yaml"
    path.write_text("budgets:\n" + "".join(lines))
    await apply_policy_file(settings, topics.policies.name, path, prune=False)


@contextlib.asynccontextmanager
async def _pipeline(env: dict[str, str], root: Path, roles: tuple[str, ...]) -> AsyncIterator[list[WorkerProcess]]:
    workers = [WorkerProcess(role, env, root / f"{role}.log") for role in roles]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def _usage(request_id: str, budgets: list[str], **overrides: Any) -> bytes:
    now = datetime.now(UTC).isoformat()
    event = {
        "v": 1,
        "request_id": request_id,
        "request_occurred_at": now,
        "occurred_at": now,
        "budgets": budgets,
        "outcome": "completed",
        **LOAD_USAGE,
        **overrides,
    }
    return dumps(event)


async def _steady_load(
    producer: AIOKafkaProducer, topic: str, rate: float, stop: asyncio.Event, sent: list[int]
) -> None:
    """Usage events at ``rate`` per second, spread over 200 background budgets."""
    began = time.perf_counter()
    n = 0
    while not stop.is_set():
        due = int((time.perf_counter() - began) * rate)
        while n < due:
            await producer.send(topic, key=f"load-{n}".encode(), value=_usage(f"load-{n}", [f"load:{n % 200}"]))
            n += 1
        sent[0] = n
        await asyncio.sleep(0.005)


def bench_load(quick: bool, bootstrap: str) -> dict[str, Any]:
    """Threshold latency while 1,000 usage events/s flow; and how far a cap is overshot at 1,000 requests/s."""
    rate = 200.0 if quick else 1000.0
    trials = 5 if quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prefix = f"load{uuid.uuid4().hex[:6]}."
        env = bench_env(bootstrap, prefix, root)
        settings = settings_from_env(env)
        topics = Topics.from_settings(settings)
        return asyncio.run(_load(settings, topics, root, env, rate, trials, quick))


async def _load(
    settings: Settings, topics: Topics, root: Path, env: dict[str, str], rate: float, trials: int, quick: bool
) -> dict[str, Any]:
    await ensure_topics_now(settings, topics)
    lat = [f"lat:{i}" for i in range(trials + 1)]
    lines = [f'  - {{id: "{b}", monthly_limit_usd: "1.00", soft_limit_percent: 50}}\n' for b in lat]
    lines.append('  - {id: "cap:bounded", monthly_limit_usd: "1.00", hard_limit_action: block_cloud}\n')
    lines.append('  - {id: "cap:admitted", monthly_limit_usd: "1.00", hard_limit_action: block_cloud}\n')
    await _policies(settings, topics, root, lines)
    options = client_options(settings.kafka)
    async with _pipeline(env, root, ("enrich", "aggregate")):
        await wait_heartbeats(settings, topics)
        producer = AIOKafkaProducer(**options, enable_idempotence=True, linger_ms=2)
        await producer.start()
        consumer = AIOKafkaConsumer(**options, enable_auto_commit=False)
        await consumer.start()
        stop = asyncio.Event()
        sent = [0]
        load = asyncio.create_task(_steady_load(producer, topics.usage.name, rate, stop, sent))
        try:
            samples = await _crossings(producer, consumer, topics, lat)
            window_began, window_sent = time.perf_counter(), sent[0]
            await asyncio.sleep(2)
            achieved = (sent[0] - window_sent) / (time.perf_counter() - window_began)
            overshoot = await _overshoot(settings, topics, rate, quick)
        finally:
            stop.set()
            await load
            await producer.stop()
            await consumer.stop()
    return {
        "rate_per_s": rate,
        "achieved_per_s": achieved,
        "trials": trials,
        "latency": quantiles_ms(samples),
        **overshoot,
    }


async def _crossings(
    producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, topics: Topics, budgets: list[str]
) -> list[float]:
    """Milliseconds from the usage that takes each budget over its soft limit to its status on the topic
    (the first budget only warms up)."""
    tp = TopicPartition(topics.status.name, 0)
    consumer.assign([tp])
    await asyncio.sleep(3)  # the load settles in
    await consumer.seek_to_end(tp)
    samples = []
    for index, budget in enumerate(budgets):
        # 240,000 input tokens of gpt-4o: $0.60, over the soft limit of $0.50
        value = _usage(f"x-{budget}", [budget], model="gpt-4o", input_tokens=240_000, output_tokens=0)
        began = time.perf_counter()
        await producer.send_and_wait(topics.usage.name, key=f"x-{budget}".encode(), value=value)
        while True:
            batch = await consumer.getmany(tp, timeout_ms=10_000)
            if not batch:
                raise TimeoutError(f"no status for {budget} under load")
            if any(r.key == budget.encode() and loads(r.value)["status"] == "soft_limit" for r in batch[tp]):
                if index:
                    samples.append((time.perf_counter() - began) * 1000)
                break
        await asyncio.sleep(0.1)
    return samples


async def _overshoot(settings: Settings, topics: Topics, rate: float, quick: bool) -> dict[str, Any]:
    """A router (BudgetView + publisher, as the example gateway does) sends ``rate`` requests/s at a $1 budget
    whose hard limit blocks cloud; each request costs what it was estimated at. How far does spend pass $1?"""
    from budgetflow.streams.gateway.publisher import BudgetPublisher
    from budgetflow.streams.gateway.view import BudgetView
    from budgetflow.streams.ops.readback import read_period_states

    out: dict[str, Any] = {}
    cost = LOAD_COST_PICO * 20  # $0.0054 a request: about 185 requests fill the budget
    async with BudgetView(settings) as view, BudgetPublisher(settings, buffer_max=100_000) as publisher:
        await view.ready(timeout_s=60)
        for budget, admit in (("cap:bounded", False), ("cap:admitted", True)):
            n, allowed = await _route(view, publisher, budget, admit, rate, 5 if quick else 10, cost)
            await publisher.flush()
            await asyncio.sleep(3)
            states = await read_period_states(settings, topics.state.name)
            spend = sum(s.settled for (b, _), s in states.items() if b == budget)
            out[budget.split(":")[1]] = {
                "requests": n,
                "allowed": allowed,
                "spend_usd": spend / 1e12,
                "overshoot_usd": (spend - 10**12) / 1e12,
                "overshoot_requests": (spend - 10**12) / cost,
            }
    out["request_cost_usd"] = cost / 1e12
    return {"overshoot": out}


async def _route(
    view: BudgetView, publisher: BudgetPublisher, budget: str, admit: bool, rate: float, seconds: float, cost: int
) -> tuple[int, int]:
    """Route ``rate`` requests/s at ``budget`` for ``seconds``, each one the view allows published with its usage
    (and admitted first when ``admit``); return how many were routed and how many allowed."""
    from budgetflow.streams.gateway.routing import Candidate
    from budgetflow.streams.gateway.usage import Usage

    cloud = [Candidate("gpt-4o-mini", "cloud", 1.0)]
    allowed = 0
    began = time.perf_counter()
    n = 0
    deadline = began + seconds
    while time.perf_counter() < deadline:
        due = int((time.perf_counter() - began) * rate)
        while n < due:
            decision = view.decide(f"{budget}-{n}", [budget], cloud)
            n += 1
            if decision.rejection is not None:
                continue
            handle = await publisher.publish_request(
                request_id=f"{budget}-{n}",
                model="gpt-4o-mini",
                provider="openai",
                backend="cloud",
                budgets=[budget],
                input_bytes=4000,
                max_tokens=4000,
            )
            if admit:
                view.admit([budget], cost, request=handle)
            await publisher.publish_usage(handle, Usage(input_tokens=20_000, output_tokens=4_000))
            allowed += 1
        await asyncio.sleep(0.001)
    return n, allowed


def bench_recovery(quick: bool, bootstrap: str) -> dict[str, Any]:
    """An aggregate worker holding 100,000 budgets: stop to ready on its RocksDB store, from an empty store
    (the whole changelog), and with no state at all; its RSS and state bytes per budget."""
    budgets = 2_000 if quick else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prefix = f"rec{uuid.uuid4().hex[:6]}."
        port = free_port()
        env = bench_env(bootstrap, prefix, root, BUDGETFLOW_WEB__PORT=str(port))
        settings = settings_from_env(env)
        topics = Topics.from_settings(settings)
        return asyncio.run(_recovery(settings, topics, root, env, port, budgets))


async def _ready_in(env: dict[str, str], root: Path, port: int, label: str) -> tuple[float, WorkerProcess]:
    began = time.perf_counter()
    worker = WorkerProcess("aggregate", env, root / f"aggregate-{label}.log")
    async with aiohttp.ClientSession() as http:
        while True:
            if not worker.alive:
                raise RuntimeError(f"the aggregate worker exited; see {worker.log}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return time.perf_counter() - began, worker
            await asyncio.sleep(0.05)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _wait_applied(port: int) -> int:
    """Until the aggregate on ``port`` has applied everything (its lag is 0 on every partition); return how many
    budgets its /metrics export."""
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            lags = [
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("budgetflow_consumer_lag_records{")
            ]
            if lags and max(lags) == 0:
                return text.count("budgetflow_budget_requests{")
            await asyncio.sleep(1)


async def _recovery(
    settings: Settings, topics: Topics, root: Path, env: dict[str, str], port: int, budgets: int
) -> dict[str, Any]:
    await ensure_topics_now(settings, topics)
    empty_s, worker = await _ready_in(env, root, port, "empty")
    empty_rss = _rss(worker.proc.pid)
    await fill(settings, topics.ledger.name, ledger_entries(budgets * 2, [f"team:{i}" for i in range(budgets)]))
    spends = await _wait_applied(port)
    loaded_rss = _rss(worker.proc.pid)
    worker.stop()
    store_bytes = sum(p.stat().st_size for p in (root / "aggregate").rglob("*") if p.is_file())
    from budgetflow.streams.kafka.follow import read_topic

    changelog = len(await read_topic(settings, topics.state.name))
    rocks_s, worker = await _ready_in(env, root, port, "rocksdb")
    worker.stop()
    import shutil

    shutil.rmtree(root / "aggregate")
    replay_s, worker = await _ready_in(env, root, port, "replay")
    worker.stop()
    return {
        "budgets": budgets,
        "ready_empty_state_s": empty_s,
        "ready_rocksdb_s": rocks_s,
        "ready_from_changelog_s": replay_s,
        "changelog_records": changelog,
        "rss_empty_bytes": empty_rss,
        "rss_loaded_bytes": loaded_rss,
        "store_bytes": store_bytes,
        "store_bytes_per_budget": store_bytes / budgets,
        "rss_bytes_per_budget": (loaded_rss - empty_rss) / budgets,
        "exported_budgets": spends,
    }
