"""The real pipeline on a three-node cluster rides through SIGKILLs of the nodes that lead its traffic.

A 3-node local cluster (``LocalCluster``), budgetflow's topics on it with replication factor 3 and
``min.insync.replicas=2``, the enrich and aggregate workers as processes (as every pipeline test starts them), and
a gateway's BudgetPublisher (acks=all) sending a steady stream of requests and their usage, each of a cost known
here exactly. Mid-stream, one after the other, each node SIGKILLed is restarted and back in every in-sync replica
set before the next goes:

1. the leader of the ledger partition that carries every request (``global``'s);
2. the leader of the status topic's partition;
3. the active controller (the KRaft quorum's leader, as ``kafka-metadata-quorum describe --status`` says).

While each node is down, statuses must keep coming (the router's view sees ``global``'s spend grow). At the end
the workers are the same processes, alive, and neither restarted its role in-process (``lost the broker``); the
aggregate's state holds every budget's total exactly, to the pico-dollar, once; the status topic's latest status
of each budget, the view that followed through the kills and a view started afresh all say the same totals.

The short form (CI) kills one node of each kind; ``BUDGETFLOW_TEST_CLUSTER_KILLS=N`` runs the three kills N times.
Every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from budgetflow.schemas.settings import LocalKafkaSettings
from budgetflow.streams.dev.clusterfaults import Outage, kill_and_restart, partition_leader, quorum_leader, until
from budgetflow.streams.dev.localcluster import LocalCluster

KILLS = int(os.environ.get("BUDGETFLOW_TEST_CLUSTER_KILLS", "1"))
pytestmark = pytest.mark.timeout(300 + 180 * KILLS)

# test-small's rates in pico-dollars per token (conftest's TEST_PRICES), written out again: the expectation does
# not use budgetflow's pricing code.
RATE_IN, RATE_OUT = 1_000_001, 2_500_000
# Who each request is charged to, in turn (``global`` is implied for every one).
CHARGED = (("team:a",), ("team:b",), ("key:k1",), ("team:a", "team:b"))
REQUESTS_PER_S = 25  # a steady gateway: statuses change every second


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Three nodes in a fresh data dir; all stopped at the end."""
    cluster = LocalCluster(tmp_path, LocalKafkaSettings(), size=3)
    try:
        yield cluster
    finally:
        cluster.stop()
        assert all(pid is None for pid in cluster.pids().values()), "every node stopped"


@dataclass
class Gateway:
    """Publishes request + usage pairs at a steady rate until stopped; what each budget must total."""

    publisher: Any
    expected: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        from budgetflow.streams import Usage

        while not self.stop.is_set():
            began = time.monotonic()
            i = self.sent
            charged = CHARGED[i % len(CHARGED)]
            tokens_in, tokens_out = 200 + (i * 37) % 900, 50 + (i * 13) % 400
            handle = await self.publisher.publish_request(
                request_id=f"req-{i:06d}",
                model="test-small",
                provider="testco",
                backend="cloud",
                budgets=list(charged),
                input_bytes=4 * tokens_in,
                max_tokens=tokens_out,
            )
            await self.publisher.publish_usage(handle, Usage(input_tokens=tokens_in, output_tokens=tokens_out))
            for budget in {*charged, "global"}:
                self.expected[budget] += tokens_in * RATE_IN + tokens_out * RATE_OUT
                self.requests[budget] += 1
            self.sent += 1
            # A rate, not a wait for a condition: the gateway's traffic goes on through every fault.
            await asyncio.sleep(max(0.0, 1 / REQUESTS_PER_S - (time.monotonic() - began)))

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task


# Long: one scenario in order (cluster, workers, traffic, three kinds of kill, the totals), told as it runs.
async def test_pipeline_rides_through_leader_and_controller_kills(
    cluster: LocalCluster, pipeline_factory: Any, kit: Any, tmp_path: Path
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from budgetflow.streams import BudgetPublisher, BudgetView
    from budgetflow.streams.kafka.clients import client_options
    from budgetflow.streams.kafka.topics import partition_for

    began = time.monotonic()
    bootstrap = await asyncio.to_thread(cluster.start)
    pipeline = pipeline_factory(
        bootstrap,
        clock_start=datetime.now(UTC).isoformat(),
        speed=1.0,
        partitions=2,
        extra_env={"BUDGETFLOW_TOPICS__REPLICATION_FACTOR": "3"},
    )
    (pipeline.root / "policies.yaml").write_text(kit.POLICIES)
    for args in (("topics", "create"), ("policy", "apply", str(pipeline.root / "policies.yaml"))):
        proc = await asyncio.to_thread(pipeline.cli, *args)
        assert proc.returncode == 0, proc.stderr
    workers = [pipeline.start("enrich"), pipeline.start("aggregate")]
    pids = [w.proc.pid for w in workers]
    settings = pipeline.settings()
    topics = pipeline.topics
    admin = AIOKafkaAdminClient(**{**client_options(settings.kafka), "request_timeout_ms": 5000})
    await admin.start()
    outages: list[Outage] = []
    try:
        async with (
            BudgetPublisher(settings, spool_dir=tmp_path / "spool") as publisher,
            BudgetView(settings) as view,
        ):
            gateway = Gateway(publisher)
            gateway.start()
            await until("a first status of global", lambda: view.last_status("global").spend_pico > 0, 120)
            print(f"cluster, topics, workers and a first status in {time.monotonic() - began:.1f} s")

            async def kill(node: int, led: str, moved: Any) -> None:
                async def statuses_go_on() -> None:
                    # Counted from the new leader on, so no status already in flight at the kill passes for one.
                    since = view.last_status("global").spend_pico
                    await until(
                        f"a newer status of global without node {node}",
                        lambda: view.last_status("global").spend_pico > since,
                        90,
                    )
                    assert all(w.alive for w in workers), pipeline.logs()

                outage = await kill_and_restart(cluster, admin, node, led, moved=moved, while_down=statuses_go_on)
                outages.append(outage)
                print(
                    f"node {node} led {led}: led elsewhere after {outage.moved_s:.1f} s, statuses went on, "
                    f"restarted after {outage.down_s:.1f} s, all in sync {outage.in_sync_s:.1f} s later"
                )

            ledger = (topics.ledger.name, partition_for("global", topics.ledger.partitions))
            for _ in range(KILLS):
                for topic, partition in (ledger, (topics.status.name, 0)):
                    node = await leader(admin, topic, partition)

                    async def moved(topic: str = topic, partition: int = partition, node: int = node) -> bool:
                        return (await partition_leader(admin, topic, partition)) not in (None, node)

                    await kill(node, f"{topic} partition {partition}", moved)
                controller = await quorum_leader(cluster)
                assert controller is not None

                async def elected(node: int = controller) -> bool:
                    return (await quorum_leader(cluster)) not in (None, node)

                await kill(controller, "the controller quorum", elected)
            await gateway.finish()
            await publisher.flush(60)
            await check_totals(pipeline, view, gateway, settings)
            print(f"{gateway.sent} requests, publisher {publisher.counts}")
    except BaseException:
        print(pipeline.logs())
        raise
    finally:
        await admin.close()
    for worker, pid in zip(workers, pids, strict=True):
        assert (worker.alive, worker.proc.pid) == (True, pid), worker.tail()
        log = worker.log.read_text(errors="replace")
        assert "lost the broker" not in log, f"the {worker.role} role restarted in its process:\n{worker.tail()}"
    print(f"{len(outages)} kills in {time.monotonic() - began:.1f} s")


async def leader(admin: Any, topic: str, partition: int) -> int:
    found: list[int] = []

    async def led() -> bool:
        node = await partition_leader(admin, topic, partition)
        found.append(node or 0)
        return node is not None

    await until(f"a leader of {topic} partition {partition}", led, 60)
    return found[-1]


def pipeline_period() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


async def check_totals(pipeline: Any, view: Any, gateway: Gateway, settings: Any) -> None:
    """Every budget's total exact and counted once: in the aggregate's state, on the status topic, in the view that
    followed through the kills and in one started now."""
    from budgetflow.schemas.events import BudgetStatus
    from budgetflow.schemas.serde import decode
    from budgetflow.streams import BudgetView

    states: dict[tuple[str, str], Any] = {}

    async def exact() -> bool:
        nonlocal states
        states = await pipeline.period_states()
        return {b: s.settled for (b, _), s in states.items()} == dict(gateway.expected) and not any(
            s.reserved for s in states.values()
        )

    with contextlib.suppress(TimeoutError):
        await until("the state holds every total", exact, 120, interval_s=1.0)
    got = {b: (s.settled, s.reserved) for (b, _), s in states.items()}
    assert got == {b: (v, 0) for b, v in gateway.expected.items()}, "(settled, reserved) per budget"
    assert {b: s.requests for (b, _), s in states.items()} == dict(gateway.requests)
    assert {b: s.settles for (b, _), s in states.items()} == dict(gateway.requests)
    assert await pipeline.dead_letters() == []

    latest: dict[str, Any] = {}

    async def published() -> bool:
        for _, _, value, _ in await pipeline.records(pipeline.topics.status.name):
            if value is not None:
                status = decode(BudgetStatus, value)[0]
                latest[status.budget_id] = status
        return all(b in latest and latest[b].spend_usd == v for b, v in gateway.expected.items())

    await until("the status topic shows every total", published, 60, interval_s=1.0)
    for budget in gateway.expected:
        status = latest[budget]
        assert status.period == pipeline_period(), status
        assert status.limit_usd is not None, status
        if status.spend_usd >= status.limit_usd:
            assert status.status == "hard_limit", status
    async with BudgetView(settings) as fresh:
        await fresh.ready(60)
        for router in (view, fresh):
            await until(
                "the view shows every total",
                lambda r=router: all(r.last_status(b).spend_pico == v for b, v in gateway.expected.items()),
                60,
            )
            for budget in gateway.expected:
                state = router.last_status(budget)
                assert (state.status, state.spend_pico) == (latest[budget].status, latest[budget].spend_usd)
