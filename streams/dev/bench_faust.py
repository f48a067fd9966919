"""`budgetflow bench --only faust`: the aggregate beside the Faust app that the design first planned, same run.

Two measures, on the bench's broker (docs/performance.md, "Why not Faust"):

* throughput: one ledger topic filled once; a raw consumer, one budgetflow aggregate worker and one Faust worker
  (:mod:`budgetflow.streams.dev.faust_app`: a spend table and a dedupe table, one write to each per entry) read it
  in turn, each from its start; entries per second and their ratios to the raw consumer;
* kill -9: each system's worker process SIGKILLed twice while entries arrive, restarted each time, then its final
  sums per budget (pico-dollars) beside the exact ones.

Faust runs in a venv of its own, as a child process (:mod:`budgetflow.streams.dev.faust_worker`).
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from budgetflow.schemas.settings import Settings
from budgetflow.streams.dev.bench_common import (
    GroupOffsets,
    aggregate_rate,
    bench_env,
    bench_settings,
    fill,
    ledger_entries,
    raw_consume,
)
from budgetflow.streams.dev.faust_worker import (
    FAUST_REQUIREMENT,
    FaustWorker,
    faust_python,
    faust_settles_seen,
    faust_sums,
    faust_topics,
)
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now
from budgetflow.streams.service.launch import WorkerProcess, log_tail

__all__ = ["bench_faust"]

TAKE = 2_000  # the batch of the Faust agent that reads with stream.take
IDLE_S = 20.0  # a Faust worker that has counted nothing for this long after the feed has read everything
SETTLE_PICO = 900_000_000  # what ledger_entries settles per request (its reserve is 1,000,000,000)


async def _faust_rate(worker: FaustWorker, total: int, timeout_s: float) -> dict[str, Any]:
    """Entries per second of the Faust worker from its first entry to its ``total``-th; a failure instead when it
    crashes, or stalls for a minute, or takes more than ``timeout_s``."""
    began = moved = time.monotonic()
    seen = 0
    try:
        while (now := time.monotonic()) < began + timeout_s and now < moved + 60:
            progress = worker.progress()
            if progress.get("target_at") is not None:
                return {"per_s": total / (progress["target_at"] - progress["first_at"])}
            if (failure := worker.failure()) is not None:
                return {"per_s": None, "failed": f"{failure} ({seen:,} entries counted before)"}
            if progress["processed"] > seen:
                seen, moved = progress["processed"], now
            await asyncio.sleep(0.25)
        return {"per_s": None, "failed": f"{seen:,} of {total:,} in {now - began:.0f} s, then none"}
    finally:
        worker.stop()


async def _throughput(bootstrap: str, root: Path, python: Path, n: int, budgets: list[str]) -> dict[str, Any]:
    """Raw consumer, aggregate and Faust (event by event, then in ``stream.take`` batches), one after the other,
    on one ledger topic filled once; with no kill, every one's final sums should be exact."""
    settings = bench_settings(bootstrap, f"fst{uuid.uuid4().hex[:6]}.", root / "throughput", heartbeat_s=1.0)
    topics = Topics.from_settings(settings)
    await ensure_topics_now(settings, topics)
    await fill(settings, topics.ledger.name, ledger_entries(n, budgets))
    raw = await raw_consume(settings, topics.ledger.name, n)
    ours = await aggregate_rate(settings, n)
    expected = _expected(n, budgets)
    results: dict[str, Any] = {"entries": n, "budgets": len(budgets), "raw_consumer_per_s": raw}
    results["aggregate"] = {"per_s": ours, "ratio": ours / raw}
    results["aggregate"]["exact"] = _score(expected, await _ledger_sums(settings))["exact"]
    for name, take in (("faust", 0), ("faust_take", TAKE)):
        app_id = f"{settings.topics.prefix}{name.replace('_', '-')}"
        await faust_topics(settings, app_id)
        worker = FaustWorker(python, bootstrap, app_id, topics.ledger.name, root / "throughput", n, take)
        row = await _faust_rate(worker, n, timeout_s=max(120.0, n / 400))
        row["ratio"] = None if row["per_s"] is None else row["per_s"] / raw
        row["exact"] = _score(expected, await faust_sums(settings, app_id))["exact"]
        results[name] = {**row, "take": take} if take else row
    return results


class _Feed:
    """Produces records at about ``per_s``, a tenth of a second's worth at a time, through one producer; ``fed``
    counts what has been sent, ``finished`` says it has stopped."""

    def __init__(self, settings: Settings, topic: str, records: list[tuple[str, bytes]], per_s: float) -> None:
        self.settings, self.topic, self.records, self.per_s = settings, topic, records, per_s
        self.fed = 0
        self.finished = False

    async def run(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(**client_options(self.settings.kafka), linger_ms=5, enable_idempotence=True)
        await producer.start()
        try:
            step = max(1, int(self.per_s / 10))
            began = time.monotonic()
            for index in range(0, len(self.records), step):
                for key, value in self.records[index : index + step]:
                    await producer.send(self.topic, key=key.encode(), value=value)
                self.fed = min(len(self.records), index + step)
                ahead = began + (index + step) / self.per_s - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await producer.flush()
        finally:
            self.finished = True
            await producer.stop()


def _score(expected: Counter[str], found: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
    """Final sums (settled, reserved, settles) per budget beside the exact ones: what is wrong, and how much."""
    wrong, lost, doubled, settled_error, reserved_error = 0, 0, 0, 0, 0
    for budget in sorted(set(expected) | set(found)):
        settles = expected.get(budget, 0)
        settled, reserved, counted = found.get(budget, (0, 0, 0))
        wrong += (settled, reserved, counted) != (settles * SETTLE_PICO, 0, settles)
        lost += max(0, settles - counted)
        doubled += max(0, counted - settles)
        settled_error += abs(settled - settles * SETTLE_PICO)
        reserved_error += abs(reserved)
    return {
        "exact": wrong == 0,
        "budgets": len(expected),
        "wrong_budgets": wrong,
        "settles_lost": lost,
        "settles_doubled": doubled,
        "settled_error_pico": settled_error,
        "reserved_left_pico": reserved_error,
    }


async def _ledger_sums(settings: Settings) -> dict[str, tuple[int, int, int]]:
    """Per budget, (settled, reserved, settles) as budgetflow's aggregate holds them (its changelog)."""
    from budgetflow.streams.ops.readback import read_period_states

    states = await read_period_states(settings, Topics.from_settings(settings).state.name)
    return {budget: (s.settled, s.reserved, s.settles) for (budget, _), s in states.items()}


def _expected(n: int, budgets: list[str]) -> Counter[str]:
    """The settles per budget of ``ledger_entries(n, budgets)``: each is exact when its sums are these."""
    return Counter(budgets[i % len(budgets)] for i in range(n // 2))


class _Idle:
    """How long a Faust worker has counted no entry (its offsets may trail far behind what it has written: it is
    done when it reads nothing more). Never idle for budgetflow's worker, which commits what it has written."""

    def __init__(self, worker: FaustWorker | WorkerProcess) -> None:
        self.worker = worker
        self.processed, self.since = -1, time.monotonic()

    def for_s(self) -> float:
        if not isinstance(self.worker, FaustWorker):
            return 0.0
        processed = self.worker.progress()["processed"]
        if processed != self.processed:
            self.processed, self.since = processed, time.monotonic()
        return time.monotonic() - self.since


def _failure(worker: FaustWorker | WorkerProcess) -> str | None:
    if isinstance(worker, FaustWorker):
        return worker.failure()
    return None if worker.alive else f"exited: {log_tail(worker.log, 3)}"


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return False


# One run of the kill test, in order: the worker up and committing, the feed on; twice, once a third (then two
# thirds) of the entries are sent and the worker (restarted) has committed something, a SIGKILL and a restart (at
# a moment set by the feed, not by the worker's commits); the feed done, the topic committed to its end (the
# system's own records, such as the aggregate's ticks, included) or the Faust worker idle, or a stall noted; a
# graceful stop, and what the group has committed then (budgetflow commits what it applied; Faust often much less).
async def _killed_twice(
    settings: Settings,
    topic: str,
    records: list[tuple[str, bytes]],
    group: str,
    start: Callable[[int], FaustWorker | WorkerProcess],
    per_s: float,
    wait_s: float,
) -> dict[str, Any]:
    n = len(records)
    began = time.monotonic()
    worker = start(0)
    head = max(1, n // 50)  # the first entries at once: the feed goes on once the worker has committed some
    await fill(settings, topic, records[:head])
    feeder = _Feed(settings, topic, records[head:], per_s)
    feed: asyncio.Task[None] | None = None
    kills: list[int] = []
    stalls: list[str] = []
    committed_at_end: list[int] = []
    try:
        async with GroupOffsets(settings, group, topic) as offsets:

            async def committing(since: int, what: str, worker: FaustWorker | WorkerProcess) -> None:
                async def past() -> bool:
                    return await offsets.total() > since or _failure(worker) is not None

                if not await _until(past, wait_s):
                    stalls.append(f"no commit within {wait_s:.0f} s of {what}")
                elif (failure := _failure(worker)) is not None:
                    stalls.append(f"after {what}: {failure}")

            await committing(0, "the start", worker)
            feed = asyncio.create_task(feeder.run())
            for k in (1, 2):

                async def fed(goal: int = k * n // 3 - head) -> bool:
                    return feeder.fed >= goal or feeder.finished

                await _until(fed, n / per_s + wait_s)
                since = await offsets.total()
                kills.append(since)
                worker.kill()
                worker = start(k)
                await committing(since, f"restart {k}", worker)
            await feed
            ends = await offsets.ends()
            idle = _Idle(worker)

            async def done() -> bool:
                committed = await offsets.committed()
                return all(committed.get(p, -1) >= end for p, end in ends.items()) or idle.for_s() >= IDLE_S

            if not await _until(done, wait_s):
                stalls.append(f"{await offsets.total():,} of {sum(ends.values()):,} committed in {wait_s:.0f} s")
            worker.stop()  # gracefully, then its committed offsets: where a restart would replay from
            committed_at_end = [await offsets.total(), sum(ends.values())]
    finally:
        if feed is not None:
            feed.cancel()
        worker.stop()
    elapsed = round(time.monotonic() - began, 1)
    return {"killed_at_committed": kills, "committed_at_end": committed_at_end, "stalls": stalls, "elapsed_s": elapsed}


async def _kill_test(bootstrap: str, root: Path, python: Path, n: int, budgets: list[str], per_s: float) -> Any:
    """Both systems through two SIGKILLs each, on topics of their own fed the same entries."""
    records = ledger_entries(n, budgets)
    expected = _expected(n, budgets)
    wait_s = max(60.0, n / 250)
    results: dict[str, Any] = {"entries": n, "budgets": len(budgets), "feed_per_s": per_s}

    prefix = f"fkb{uuid.uuid4().hex[:6]}."
    env = bench_env(bootstrap, prefix, root / "kill-budgetflow")
    settings = bench_settings(bootstrap, prefix, root / "kill-budgetflow")
    await ensure_topics_now(settings, Topics.from_settings(settings))

    def aggregate(k: int) -> WorkerProcess:
        return WorkerProcess("aggregate", env, root / "kill-budgetflow" / f"aggregate-{k}.log")

    topic = Topics.from_settings(settings).ledger.name
    run = await _killed_twice(settings, topic, records, f"{prefix}aggregate", aggregate, per_s, wait_s)
    results["budgetflow"] = {**_score(expected, await _ledger_sums(settings)), **run}

    prefix = f"fkf{uuid.uuid4().hex[:6]}."
    settings = bench_settings(bootstrap, prefix, root / "kill-faust")
    await ensure_topics_now(settings, Topics.from_settings(settings))
    app_id, topic = f"{prefix}faust", Topics.from_settings(settings).ledger.name
    await faust_topics(settings, app_id)

    def faust(k: int) -> FaustWorker:
        return FaustWorker(python, bootstrap, app_id, topic, root / "kill-faust" / str(k))

    run = await _killed_twice(settings, topic, records, app_id, faust, per_s, wait_s)
    sums = await faust_sums(settings, app_id)
    results["faust"] = {**_score(expected, sums), **run}
    # The settles its dedupe table holds and its sums miss are lost for good: a restart skips them as counted.
    seen = await faust_settles_seen(settings, app_id)
    results["faust"]["settles_lost_for_good"] = sum(max(0, n - sums.get(b, (0, 0, 0))[2]) for b, n in seen.items())
    return results


def bench_faust(quick: bool, bootstrap: str) -> dict[str, Any]:
    """Throughput of the aggregate and of a Faust app beside a raw consumer; both under two SIGKILLs."""
    try:
        python = faust_python()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return {"skipped": str(exc)}
    n, kill_n = (4_000, 2_000) if quick else (200_000, 50_000)
    budgets = [f"team:{i}" for i in range(1000)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        throughput = asyncio.run(_throughput(bootstrap, root, python, n, budgets))
        kills = asyncio.run(_kill_test(bootstrap, root, python, kill_n, budgets[:100], 100 if quick else 1_000))
    return {"faust": FAUST_REQUIREMENT, "throughput": throughput, "kill9": kills}
