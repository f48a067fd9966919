"""`budgetflow bench --only cluster`: how long routers go without a fresh status while the status partition's
leader is SIGKILLed and another node takes over, beside the same measure with no kill, in the same run.

A three-node :class:`LocalCluster` of its own (in a temporary dir, never the bench broker), budgetflow's topics on
it with replication factor 3 and ``min.insync.replicas=2``, the enrich and aggregate workers as processes, and in
this process a gateway (``BudgetPublisher``, acks=all) sending ``REQUESTS_PER_S`` requests with their usage over
``BUDGETS`` budgets, so that statuses change all the time (``STATUS__REFRESH_S=0.1``), and a router's
``BudgetView`` following them. Per trial, over one window:

* **gap**: the longest time between two statuses reaching the view (the router's news stops, then resumes);
* **age**: the oldest the newest status the view holds gets (now minus its ``as_of``), sampled every 20 ms.

A *kill* trial's window runs from the SIGKILL of the status partition's leader until a status has arrived after
the admin client saw a new leader, plus one second of flow; the node is then started again and the cluster fully
in sync before the next trial. A *baseline* trial is a window of the same length with no fault. Trials alternate
kill, baseline (quick: one pair; full: five). At the end the ledger's totals are compared with what the gateway
sent (exact: nothing lost, nothing counted twice through the kills).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from budgetflow.schemas.events import BudgetStatus
from budgetflow.schemas.settings import LocalKafkaSettings, Settings, settings_from_env
from budgetflow.streams.dev.bench_common import bench_env, wait_heartbeats
from budgetflow.streams.dev.clusterfaults import kill_and_restart, partition_leader, until
from budgetflow.streams.dev.localcluster import LocalCluster
from budgetflow.streams.gateway.view import BudgetView
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now
from budgetflow.streams.service.launch import WorkerProcess, log_tail

__all__ = ["bench_cluster"]

REQUESTS_PER_S = 25
BUDGETS = tuple(f"bench:{i}" for i in range(8))
REFRESH_S = "0.1"
FLOW_AFTER_S = 1.0  # a kill's window ends this long after the first status that followed the new leader
MODEL, RATE_IN, RATE_OUT = "cluster-model", 1_000_000, 2_000_000  # pico-dollars per token
PRICES = f"""as_of: "2026-11-01"
models:
  - match: "{MODEL}"
    provider: benchco
    input_usd_per_mtok: "1"
    output_usd_per_mtok: "2"
    source: "budgetflow bench cluster"
"""


class _TimedView(BudgetView):
    """A router's view that notes when each status reaches it, and the newest ``as_of`` it holds."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.arrivals: list[float] = []  # monotonic
        self.newest_as_of = 0.0  # wall clock

    def apply_status(self, record: BudgetStatus) -> bool:
        kept = super().apply_status(record)
        if kept:
            self.arrivals.append(time.monotonic())
            self.newest_as_of = max(self.newest_as_of, record.as_of.timestamp())
        return kept

    def window(self, began: float, ended: float) -> dict[str, float]:
        """The longest time without a status over [began, ended] (from the last one before ``began``)."""
        before = [a for a in self.arrivals if a <= began][-1:]
        inside = [a for a in self.arrivals if began < a <= ended]
        marks = [*(before or [began]), *inside, ended]
        return {"gap_s": max(later - earlier for earlier, later in itertools.pairwise(marks))}


class _Gateway:
    """Requests and their usage at a steady rate, spread over the budgets; what each budget must total."""

    def __init__(self, publisher: Any) -> None:
        self.publisher = publisher
        self.expected: Counter[str] = Counter()
        self.sent = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        from budgetflow.streams.gateway.usage import Usage

        while not self.stop.is_set():
            began = time.monotonic()
            i = self.sent
            budget = BUDGETS[i % len(BUDGETS)]
            tokens_in, tokens_out = 100 + (i * 37) % 500, 20 + (i * 13) % 200
            handle = await self.publisher.publish_request(
                request_id=f"c{i}",
                model=MODEL,
                provider="benchco",
                backend="cloud",
                budgets=[budget],
                input_bytes=4 * tokens_in,
                max_tokens=tokens_out,
            )
            await self.publisher.publish_usage(handle, Usage(input_tokens=tokens_in, output_tokens=tokens_out))
            for charged in (budget, "global"):
                self.expected[charged] += tokens_in * RATE_IN + tokens_out * RATE_OUT
            self.sent += 1
            await asyncio.sleep(max(0.0, 1 / REQUESTS_PER_S - (time.monotonic() - began)))


async def _sample_ages(view: _TimedView, ages: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        if view.newest_as_of:
            ages.append(time.time() - view.newest_as_of)
        await asyncio.sleep(0.02)


def _measured(view: _TimedView, began: float, ended: float, ages: list[float]) -> dict[str, Any]:
    return {**view.window(began, ended), "max_age_s": max(ages, default=0.0)}


async def _trials(cluster: LocalCluster, settings: Settings, topics: Topics, view: _TimedView, kills: int) -> Any:
    """Kill, baseline, kill, baseline...: one dict per trial."""
    from aiokafka.admin import AIOKafkaAdminClient

    from budgetflow.streams.kafka.clients import client_options

    admin = AIOKafkaAdminClient(**{**client_options(settings.kafka), "request_timeout_ms": 5000})
    await admin.start()
    trials: list[dict[str, Any]] = []
    try:
        for _ in range(kills):
            node = await partition_leader(admin, topics.status.name, 0)
            if node is None:
                raise RuntimeError("the status partition has no leader")
            ages: list[float] = []
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample_ages(view, ages, stop))
            began = time.monotonic()
            seen: dict[str, float] = {}

            async def moved(node: int = node, seen: dict[str, float] = seen) -> bool:
                if (await partition_leader(admin, topics.status.name, 0)) not in (None, node):
                    seen.setdefault("moved", time.monotonic())
                    return True
                return False

            async def flowing(seen: dict[str, float] = seen, stop: asyncio.Event = stop) -> None:
                await until("a status after the new leader", lambda: view.arrivals[-1] > seen["moved"], 90)
                await asyncio.sleep(FLOW_AFTER_S)  # a measuring window, not a wait for a condition
                seen["ended"] = time.monotonic()
                stop.set()

            outage = await kill_and_restart(
                cluster, admin, node, "the status partition", moved=moved, while_down=flowing
            )
            await sampler
            window = seen["ended"] - began
            measured = _measured(view, began, seen["ended"], ages)
            trials.append(
                {"kind": "kill", "node": node, "new_leader_s": outage.moved_s, "window_s": window, **measured}
            )
            trials.append(await _baseline(view, window))
    finally:
        await admin.close()
    return trials


async def _baseline(view: _TimedView, window_s: float) -> dict[str, Any]:
    """The same window with no fault."""
    ages: list[float] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_ages(view, ages, stop))
    began = time.monotonic()
    await asyncio.sleep(window_s)  # a measuring window
    stop.set()
    await sampler
    return {"kind": "baseline", "window_s": window_s, **_measured(view, began, time.monotonic(), ages)}


def _summary(trials: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    rows = [t for t in trials if t["kind"] == kind]
    out: dict[str, Any] = {"trials": len(rows)}
    for key in ("gap_s", "max_age_s", "new_leader_s"):
        values = [t[key] for t in rows if key in t]
        if values:
            out[key] = {"p50": statistics.median(values), "max": max(values)}
    return out


async def _exact(settings: Settings, topics: Topics, expected: Counter[str]) -> bool:
    from budgetflow.streams.ops.readback import read_period_states

    async def done() -> bool:
        states = await read_period_states(settings, topics.state.name)
        return {b: s.settled for (b, _), s in states.items() if not s.reserved} == dict(expected)

    try:
        await until("the ledger holds what the gateway sent", done, 120, interval_s=1.0)
    except TimeoutError:
        return False
    return True


async def _run(cluster: LocalCluster, settings: Settings, topics: Topics, root: Path, kills: int) -> dict[str, Any]:
    from budgetflow.streams.gateway.publisher import BudgetPublisher

    await wait_heartbeats(settings, topics)
    async with BudgetPublisher(settings, spool_dir=root / "spool") as publisher, _TimedView(settings) as view:
        gateway = _Gateway(publisher)
        sending = asyncio.create_task(gateway.run())
        await until("a status of every budget", lambda: len(view.budgets()) > len(BUDGETS), 90)
        trials = await _trials(cluster, settings, topics, view, kills)
        gateway.stop.set()
        await sending
        await publisher.flush(60)
        exact = await _exact(settings, topics, gateway.expected)
    return {
        "requests": gateway.sent,
        "ledger_exact": exact,
        "baseline": _summary(trials, "baseline"),
        "kill": _summary(trials, "kill"),
        "trials": trials,
    }


def bench_cluster(quick: bool, _results_dir: Path) -> dict[str, Any]:
    """Stale statuses at a leader election of the status partition, beside none (module docstring)."""
    kills = 1 if quick else 5
    with tempfile.TemporaryDirectory(prefix="budgetflow-bench-cluster-") as tmp:
        root = Path(tmp)
        cluster = LocalCluster(root, LocalKafkaSettings(), size=3)
        try:
            bootstrap = cluster.start()
            (root / "prices.yaml").write_text(PRICES)
            env = bench_env(
                bootstrap,
                f"cl{uuid.uuid4().hex[:6]}.",
                root,
                BUDGETFLOW_TOPICS__PARTITIONS="2",
                BUDGETFLOW_TOPICS__REPLICATION_FACTOR="3",
                BUDGETFLOW_STATUS__REFRESH_S=REFRESH_S,
                BUDGETFLOW_PRICING__FILE=str(root / "prices.yaml"),
            )
            settings = settings_from_env(env)
            topics = Topics.from_settings(settings)
            asyncio.run(ensure_topics_now(settings, topics))
            workers = [WorkerProcess(role, env, root / f"{role}.log") for role in ("enrich", "aggregate")]
            try:
                measured = asyncio.run(_run(cluster, settings, topics, root, kills))
                pids = [w.proc.pid for w in workers if w.alive]
                if len(pids) != len(workers):
                    raise RuntimeError("a worker exited:\n" + "\n".join(log_tail(w.log, 20) for w in workers))
            finally:
                for worker in workers:
                    worker.stop()
        finally:
            cluster.stop()
    return {
        "nodes": 3,
        "replication_factor": 3,
        "min_insync_replicas": 2,
        "requests_per_s": REQUESTS_PER_S,
        "budgets": len(BUDGETS),
        "status_refresh_s": float(REFRESH_S),
        "kills": kills,
        **measured,
    }
