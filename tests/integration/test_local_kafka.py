"""`budgetflow kafka start/stop` runs a real broker whose data survives a restart and is private."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from budgetflow.schemas.settings import LocalKafkaSettings
from budgetflow.streams.dev.localkafka import LocalKafka


async def _produce(bootstrap: str, topic: str, n: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 2, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    for i in range(n):
        await producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
    await producer.stop()  # flushes


async def _consume(bootstrap: str, topic: str, n: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(values) < n:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    values.extend(r.value for r in records)
    finally:
        await consumer.stop()
    return values


def test_data_survives_stop_and_start(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path, LocalKafkaSettings(port=0))
    try:
        first = broker.start()
        asyncio.run(_produce(first, "persisted", 500))
        assert broker.stop() is True
        assert broker.pid() is None
        second = broker.start()
        assert second == first, "a restarted broker keeps its address"
        values = asyncio.run(_consume(second, "persisted", 500))
        assert sorted(values) == sorted(f"v{i}".encode() for i in range(500))
    finally:
        broker.stop()


def test_stop_when_not_running_is_harmless(tmp_path: Path) -> None:
    assert LocalKafka(tmp_path).stop() is False


def loose_paths(root: Path) -> list[str]:
    """Everything under root that its group or others may read, write or enter (with its mode)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue  # deleted meanwhile (the broker runs)
            if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
                found.append(f"{oct(stat.S_IMODE(info.st_mode))} {path.relative_to(root)}")
    return found


async def test_the_broker_data_dir_is_private(
    kafka_data_dir: Path, topic_factory: Callable[..., Awaitable[str]], producer_factory: Callable[..., Awaitable[Any]]
) -> None:
    """The session broker's data dir: its log holds prompt text (the requests topic), so no one else reads it."""
    if os.environ.get("BUDGETFLOW_TEST_BOOTSTRAP"):
        pytest.skip("the broker is not ours (BUDGETFLOW_TEST_BOOTSTRAP)")
    home = kafka_data_dir / "kafka"
    topic = await topic_factory("private")
    producer = await producer_factory()
    await producer.send_and_wait(topic, b'{"messages": "a prompt"}', key=b"r-1")
    segments = list((home / "log").glob(f"{topic}-0/*.log"))
    assert segments, "the topic's segment is where the broker keeps it"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert loose_paths(home) == []


def test_a_start_makes_an_older_data_dir_private(tmp_path: Path) -> None:
    """A data dir left readable by an older version (0755 dirs, 0644 segments) is tightened at the next start."""
    broker = LocalKafka(tmp_path, LocalKafkaSettings(port=0))
    try:
        address = broker.start()
        asyncio.run(_produce(address, "older", 10))
        assert broker.stop() is True
        for dirpath, _, filenames in os.walk(broker.home):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(Path(dirpath) / name, 0o644)
        assert loose_paths(broker.home)
        broker.start()
        assert loose_paths(broker.home) == []
        assert stat.S_IMODE(broker.home.stat().st_mode) == 0o700
        assert sorted(asyncio.run(_consume(address, "older", 10))) == sorted(f"v{i}".encode() for i in range(10))
    finally:
        broker.stop()
