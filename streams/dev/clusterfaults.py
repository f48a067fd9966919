"""Faults on a local cluster, for the fault tests and the bench: who leads a partition or the controller quorum,
and one node SIGKILLed, led around, started again and back in sync.

Every wait is for a condition, with a deadline; a node that does not answer (the killed one, asked by the admin
client's bootstrap) only makes a question come back empty, to be asked again.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from budgetflow.streams.dev.localcluster import LocalCluster

__all__ = ["Outage", "fully_replicated", "kill_and_restart", "partition_leader", "quorum_leader", "until"]

Condition = Callable[[], bool | Awaitable[bool]]


async def until(what: str, condition: Condition, timeout_s: float = 60.0, interval_s: float = 0.1) -> float:
    """Wait for ``condition`` (polled every ``interval_s``) at most ``timeout_s``; the seconds it took."""
    began = time.monotonic()
    while True:
        result = condition()
        if await result if inspect.isawaitable(result) else result:
            return time.monotonic() - began
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(interval_s)


async def _described(admin: AIOKafkaAdminClient, topics: list[str] | None = None) -> list[dict[str, Any]] | None:
    """The topics as the admin client describes them (every topic when None), or None without an answer."""
    try:
        return list(await admin.describe_topics(topics))
    except (KafkaError, OSError):
        return None


async def partition_leader(admin: AIOKafkaAdminClient, topic: str, partition: int) -> int | None:
    """The node leading the partition now (None: no leader, or no answer)."""
    described = await _described(admin, [topic])
    for entry in described[0]["partitions"] if described else []:
        if entry["partition"] == partition and entry["leader"] >= 0 and entry["error_code"] == 0:
            return int(entry["leader"])
    return None


async def fully_replicated(admin: AIOKafkaAdminClient) -> bool:
    """Every partition of every topic (the internal ones too) has all its replicas in sync: a next node may go."""
    described = await _described(admin)
    if not described:
        return False
    partitions = [p for topic in described for p in topic["partitions"]]
    return all(p["leader"] >= 0 and set(p["isr"]) == set(p["replicas"]) for p in partitions)


async def quorum_leader(cluster: LocalCluster) -> int | None:
    """The active controller (the KRaft quorum's leader), asked without blocking the loop."""
    return await asyncio.to_thread(cluster.quorum_leader)


@dataclass(frozen=True, slots=True)
class Outage:
    """One node killed and brought back: what it led, how long each step took (seconds)."""

    node: int
    led: str  # "ledger partition 0", "the controller quorum", ...
    moved_s: float  # from the SIGKILL until another node led it
    down_s: float  # from the SIGKILL until the node was started again
    restart_s: float  # the start of the node, until it had registered
    in_sync_s: float  # from its start until every partition was fully replicated again


async def kill_and_restart(
    cluster: LocalCluster,
    admin: AIOKafkaAdminClient,
    node: int,
    led: str,
    *,
    moved: Condition,
    while_down: Callable[[], Awaitable[None]] | None = None,
    timeout_s: float = 90.0,
) -> Outage:
    """SIGKILL ``node``; wait until ``moved`` (another node leads what it led); run ``while_down`` (what must work
    without it); start it again; wait until every partition is fully replicated (so the next kill leaves two)."""
    killed_at = time.monotonic()
    await asyncio.to_thread(cluster.kill, node)
    moved_s = await until(f"{led} led elsewhere than node {node}", moved, timeout_s)
    if while_down is not None:
        await while_down()
    down_s = time.monotonic() - killed_at
    began = time.monotonic()
    await asyncio.to_thread(cluster.start_node, node)
    restart_s = time.monotonic() - began
    in_sync = await until(f"node {node} back in every in-sync replica set", lambda: fully_replicated(admin), timeout_s)
    return Outage(node, led, moved_s, down_s, restart_s, restart_s + in_sync)
