"""A three-node local cluster (`budgetflow kafka start --brokers 3`) keeps every acknowledged write through a SIGKILL
of the leader.

budgetflow's topics are created on it with replication factor 3 and ``min.insync.replicas=2``; an idempotent
producer with ``acks=all`` writes numbered records to one ledger partition while its leader is SIGKILLed, then
started again; the partition, read from the start, holds every acknowledged number once, in order.

The short form (CI) kills one leader. ``BUDGETFLOW_TEST_CLUSTER_KILLS=N`` kills the partition's leader N times, each
after the node killed before has rejoined the in-sync replicas (so the later leaders include restarted nodes).
Every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from budgetflow.schemas.settings import KafkaSettings, LocalKafkaSettings, Settings, TopicSettings
from budgetflow.streams.dev.localcluster import LocalCluster
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now

KILLS = int(os.environ.get("BUDGETFLOW_TEST_CLUSTER_KILLS", "1"))
# Records acknowledged before a kill, and while the killed node is down: writes go on without it.
BEFORE_KILL = 300
WHILE_DOWN = 300

pytestmark = pytest.mark.timeout(120 + 60 * KILLS)


# The commands run as a user runs them, without this process's BUDGETFLOW_ settings.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}


@pytest.fixture
def cluster(tmp_path: Path, budgetflow_cli: Callable[..., list[str]]) -> Iterator[LocalCluster]:
    """The cluster in a fresh data dir, for killing and restarting nodes; `budgetflow kafka stop` at the end."""
    cluster = LocalCluster(tmp_path, LocalKafkaSettings(), size=3)
    try:
        yield cluster
    finally:
        stop = subprocess.run(
            budgetflow_cli("kafka", "stop", "--data-dir", str(tmp_path)), capture_output=True, text=True, env=ENV
        )
        print(stop.stderr, end="")
        assert all(pid is None for pid in cluster.pids().values()), "every node stopped"


def kafka_command(cli: Callable[..., list[str]], cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`budgetflow kafka ARGS --data-dir <the cluster's>`."""
    command = cli("kafka", *args, "--data-dir", str(cluster.home.parent))
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=180)


async def until(what: str, condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 45.0) -> float:
    """Wait for ``condition`` (polled every 0.1 s) at most ``timeout_s``; the seconds it took."""
    began = time.monotonic()
    while not await _holds(condition):
        if time.monotonic() - began > timeout_s:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - began


async def _holds(condition: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = condition()
    return await result if inspect.isawaitable(result) else bool(result)


@dataclass
class Writer:
    """Writes numbered records, one at a time, to one partition with acks=all; counts the acknowledged ones."""

    producer: AIOKafkaProducer
    tp: TopicPartition
    acked: int = 0
    ack_times: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self.stop.is_set():
            await self.producer.send_and_wait(
                self.tp.topic, str(self.acked).encode(), key=b"budget-a", partition=self.tp.partition
            )
            self.acked += 1
            self.ack_times.append(time.monotonic())

    def reached(self, count: int) -> bool:
        """True once ``count`` records are acknowledged; a failed write fails the test here, with its error."""
        assert self.task is not None
        if self.task.done():
            self.task.result()
        return self.acked >= count

    async def finish(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task


async def partition_state(admin: AIOKafkaAdminClient, tp: TopicPartition) -> dict[str, Any] | None:
    """The partition's leader and replicas, or None when the node asked does not answer (the killed one)."""
    try:
        described = await admin.describe_topics([tp.topic])
    except KafkaError:
        return None
    return next((p for p in described[0]["partitions"] if p["partition"] == tp.partition), None)


async def test_acknowledged_writes_survive_sigkills_of_the_leader(
    cluster: LocalCluster, budgetflow_cli: Callable[..., list[str]]
) -> None:
    began = time.monotonic()
    started = await asyncio.to_thread(kafka_command, budgetflow_cli, cluster, "start", "--brokers", "3")
    assert started.returncode == 0, started.stderr
    bootstrap = started.stdout.strip()
    print(f"3 nodes ready in {time.monotonic() - began:.1f} s at {bootstrap}")
    assert bootstrap == cluster.bootstrap()
    assert len(set(bootstrap.split(","))) == 3
    again = await asyncio.to_thread(kafka_command, budgetflow_cli, cluster, "start", "--brokers", "3")
    assert (again.returncode, again.stdout.strip()) == (0, bootstrap), "a second start is harmless"
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, client_id="cluster-test"),
        topics=TopicSettings(prefix="cluster-test.", partitions=2, replication_factor=3),
    )
    topics = Topics.from_settings(settings)
    await ensure_topics_now(settings, topics)

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    tp = TopicPartition(topics.ledger.name, 0)
    writer = Writer(producer, tp)
    writer.start()
    try:
        await check_replication(admin, topics)
        for _ in range(KILLS):
            await kill_the_leader_and_restart_it(cluster, admin, writer, budgetflow_cli)
        await writer.finish()
    finally:
        if writer.task is not None:
            writer.task.cancel()
        await producer.stop()
        await admin.close()
    assert await read_all(bootstrap, tp) == [str(i).encode() for i in range(writer.acked)]


async def check_replication(admin: AIOKafkaAdminClient, topics: Topics) -> None:
    """Every partition of every topic on the three nodes, each topic with min.insync.replicas=2."""
    names = [spec.name for spec in topics.all()]
    for topic in await admin.describe_topics(names):
        assert {len(p["replicas"]) for p in topic["partitions"]} == {3}, topic
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in names])
    configs = {name: {e[0]: e[1] for e in entries} for r in responses for _, _, _, name, entries in r.resources}
    assert {name: config["min.insync.replicas"] for name, config in configs.items()} == dict.fromkeys(names, "2")


async def kill_the_leader_and_restart_it(
    cluster: LocalCluster, admin: AIOKafkaAdminClient, writer: Writer, cli: Callable[..., list[str]]
) -> None:
    start = writer.acked
    await until(f"{BEFORE_KILL} records acknowledged", lambda: writer.reached(start + BEFORE_KILL))
    state = await partition_state(admin, writer.tp)
    assert state is not None
    leader = int(state["leader"])
    at_kill = writer.acked
    await asyncio.to_thread(cluster.kill, leader)

    async def led_elsewhere() -> bool:
        state = await partition_state(admin, writer.tp)
        return state is not None and state["leader"] not in (leader, -1)

    elected = await until(f"a new leader instead of node {leader}", led_elsewhere)
    await until(f"{WHILE_DOWN} acknowledged without node {leader}", lambda: writer.reached(at_kill + WHILE_DOWN))
    times = writer.ack_times[at_kill - 1 :]
    stall = max(later - earlier for earlier, later in itertools.pairwise(times))
    assert cluster.pids()[leader] is None, "the killed node stayed down while the writes went on"
    status = await asyncio.to_thread(kafka_command, cli, cluster, "status")
    assert status.returncode == 1
    assert f"node {leader}: " in status.stderr
    assert "2 of 3 nodes running" in status.stderr

    began = time.monotonic()
    await asyncio.to_thread(cluster.start_node, leader)
    restarted = time.monotonic() - began

    async def back_in_sync() -> bool:
        state = await partition_state(admin, writer.tp)
        return state is not None and leader in state["isr"]

    rejoined = await until(f"node {leader} back in the in-sync replicas", back_in_sync)
    print(
        f"killed leader {leader}: new leader seen after {elected:.1f} s, writes paused at most {stall:.1f} s; "
        f"restarted in {restarted:.1f} s, in sync {rejoined:.1f} s later"
    )


async def read_all(bootstrap: str, tp: TopicPartition) -> list[bytes]:
    """The partition from its start to its end, as a consumer outside any group reads it."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        values: list[bytes] = []
        async with asyncio.timeout(30):
            while await consumer.position(tp) < end:
                for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                    values.extend(r.value for r in records if r.value is not None)
        return values
    finally:
        await consumer.stop()
