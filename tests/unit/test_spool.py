"""The publisher's usage spool, against a fake broker: nothing accepted is lost, whatever dies when.

The fake producer stands in for aiokafka's: ``send`` hands back a future that
the fake broker acknowledges, holds, or fails as a delivery timeout would. A
"crash" leaves the files as they are and runs nothing more, as SIGKILL does
(the integration test ``test_publisher_crash.py`` does it with a real kill).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.settings import PublisherSettings, Settings
from budgetflow.streams.gateway import publisher as publisher_module
from budgetflow.streams.gateway.publisher import BudgetPublisher, RequestHandle, SpoolFull
from budgetflow.streams.gateway.spool import Spool, parse_segment
from budgetflow.streams.gateway.usage import Usage

pytestmark = pytest.mark.timeout(60)


@dataclass
class FakeBroker:
    """What the fake producers talk to."""

    up: bool = True  # False: producers cannot start, sends time out
    acks: bool = True  # False: sends are held until ``release``
    fail_after_s: float = 0.02  # a send to a broker that is away fails after this (the delivery timeout)
    batched: int = 0
    attempts: int = 0  # sends tried
    received: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    held: list[tuple[asyncio.Future[None], tuple[str, bytes, bytes]]] = field(default_factory=list)

    def release(self) -> None:
        for future, record in self.held:
            if not future.done():
                future.set_result(None)
                self.received.append(record)
        self.held.clear()

    def usage_keys(self) -> set[str]:
        return {key.decode() for topic, key, _ in self.received if topic.endswith("usage")}


def _fail(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(KafkaTimeoutError())


class FakeProducer:
    broker: FakeBroker

    def __init__(self, **_: Any) -> None:
        pass

    async def start(self) -> None:
        if not self.broker.up:
            raise KafkaConnectionError("Unable to bootstrap from fake")

    async def send(self, topic: str, *, key: bytes, value: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        record = (topic, key, value)
        self.broker.attempts += 1
        if not self.broker.up:
            # As aiokafka's with the broker away: the first records wait in a batch that expires, later sends
            # wait for room in the accumulator and give up.
            if self.broker.batched < 3:
                self.broker.batched += 1
                loop.call_later(self.broker.fail_after_s, _fail, future)
                return future
            await asyncio.sleep(self.broker.fail_after_s)
            raise KafkaTimeoutError()
        if self.broker.acks:
            future.set_result(None)
            self.broker.received.append(record)
        else:
            self.broker.held.append((future, record))
        return future

    async def stop(self) -> None:
        pass


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    fake = FakeBroker()
    FakeProducer.broker = fake
    monkeypatch.setattr(publisher_module, "AIOKafkaProducer", FakeProducer)
    return fake


def settings(tmp_path: Path, **publisher: Any) -> Settings:
    config = {"replay_interval_s": 0.05, "delivery_timeout_ms": 1000, **publisher}
    return Settings(data_dir=tmp_path, publisher=PublisherSettings(**config))


async def call(publisher: BudgetPublisher, request_id: str) -> None:
    handle = await publisher.publish_request(
        request_id=request_id,
        model="gpt-4o",
        provider="openai",
        backend="cloud",
        budgets=["team:a"],
        input_bytes=100,
        max_tokens=10,
    )
    await publisher.publish_usage(handle, Usage(input_tokens=10, output_tokens=5))


async def until(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)


async def crash(publisher: BudgetPublisher) -> None:
    """What SIGKILL leaves: the spool files as they are; nothing more runs, nothing is cleaned up or flushed."""
    tasks = list(publisher._tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    spool = publisher._spool
    for fd in [getattr(spool, "_dir_fd", None), *(s.fd for s in getattr(spool, "_open", []))]:
        if fd is not None:
            os.close(fd)  # the kernel closes them (and drops the lock) when a process dies


def spool_line(request_id: str, topic: str = "budgetflow.usage") -> bytes:
    value = (
        f'{{"v":1,"request_id":"{request_id}","attempt":0,"request_occurred_at":"2026-11-02T10:00:00Z",'
        f'"occurred_at":"2026-11-02T10:00:01Z","budgets":["team:a"],"model":"gpt-4o","provider":"openai",'
        f'"backend":"cloud","input_tokens":10,"output_tokens":5}}'
    )
    escaped = value.replace('"', '\\"')
    return f'{{"topic":"{topic}","key":"{request_id}","value":"{escaped}"}}\n'.encode()


# -- the segment format ----------------------------------------------------------------------------------------


def test_a_torn_last_line_is_skipped_and_the_rest_is_read() -> None:
    whole = spool_line("a") + spool_line("b")
    events, skipped = parse_segment(whole + spool_line("c")[:40])
    assert [e.key for e in events] == [b"a", b"b"]
    assert skipped == [(3, True)]
    # A last line whose newline was not written is whole: kept.
    events, skipped = parse_segment(whole + spool_line("c")[:-1])
    assert [e.key for e in events] == [b"a", b"b", b"c"]
    assert skipped == []
    # Garbage in the middle (a crash can leave zeros) is skipped too, and reading goes on.
    events, skipped = parse_segment(spool_line("a") + b"\x00" * 30 + b"\n" + spool_line("b"))
    assert [e.key for e in events] == [b"a", b"b"]
    assert skipped == [(2, False)]


def test_a_process_never_appends_to_a_segment_it_did_not_create(tmp_path: Path) -> None:
    torn = tmp_path / "spool-20260101T000000000000.jsonl"
    torn.write_bytes(spool_line("old") + spool_line("cut")[:30])
    spool = Spool(tmp_path, 1 << 20)
    segment = spool.append("budgetflow.usage", b"new", b"{}")
    assert segment.path != torn
    assert torn.read_bytes().endswith(spool_line("cut")[:30])  # untouched: the next line is not glued to it
    spool.close()


def test_a_second_publisher_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    with pytest.raises(ConfigError, match="in use by another publisher"):
        Spool(tmp_path, 1 << 20)
    spool.close()
    Spool(tmp_path, 1 << 20).close()  # free again once closed (or once its process died)


# -- the publisher ---------------------------------------------------------------------------------------------


async def test_a_torn_segment_does_not_stop_replay(tmp_path: Path, broker: FakeBroker) -> None:
    """A crash tore the last line of one segment: it is skipped, counted, and every other event is sent,
    including what is published after the restart while the broker is away."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / "spool-20260101T000000000000.jsonl").write_bytes(
        spool_line("t-1") + spool_line("t-2") + spool_line("t-3")[:50]
    )
    (spool_dir / "spool-20260101T000001000000.jsonl").write_bytes(spool_line("t-4") + spool_line("t-5"))
    publisher = BudgetPublisher(settings(tmp_path), buffer_max=2, spool_dir=spool_dir)
    await publisher.start()
    try:
        broker.up = False
        for i in range(6):
            await call(publisher, f"n-{i}")
        broker.up = True
        wanted = {"t-1", "t-2", "t-4", "t-5"} | {f"n-{i}" for i in range(6)}
        await until(lambda: broker.usage_keys() >= wanted, what="every whole event delivered")
        await until(lambda: publisher.spool_bytes() == 0, what="the spool emptied")
        assert publisher.counts["spool_lines_skipped"] == 1
        assert not list(spool_dir.glob("spool-*"))
    finally:
        await publisher.stop()


async def test_a_replayed_segment_is_deleted_only_once_the_broker_acknowledged_it(
    tmp_path: Path, broker: FakeBroker
) -> None:
    """A crash after the spooled events were handed to the producer, before the broker acknowledged them, loses
    nothing: the segment is still there for the next start."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / "spool-20260101T000000000000.jsonl").write_bytes(b"".join(spool_line(f"r-{i}") for i in range(3)))
    broker.acks = False
    first = BudgetPublisher(settings(tmp_path), spool_dir=spool_dir)
    await first.start()
    await until(lambda: len(broker.held) == 3, what="the replayed events handed to the producer")
    await until(lambda: first.buffered == 0)
    for _ in range(5):
        await asyncio.sleep(0)  # let the replay loop finish its pass
    await crash(first)  # the broker never acknowledged them
    broker.held.clear()
    assert list(spool_dir.glob("spool-*")), "the segment was deleted before the broker acknowledged its events"
    broker.acks = True
    second = BudgetPublisher(settings(tmp_path), spool_dir=spool_dir)
    await second.start()
    try:
        await until(lambda: broker.usage_keys() == {"r-0", "r-1", "r-2"}, what="the events sent again")
        await until(lambda: not list(spool_dir.glob("spool-*")), what="the acknowledged segment deleted")
    finally:
        await second.stop()


async def test_usage_accepted_before_a_crash_is_sent_after_the_restart(tmp_path: Path, broker: FakeBroker) -> None:
    """publish_usage writes ahead: a process killed right after it returned, the broker away or not, loses
    nothing of what it accepted."""
    broker.fail_after_s = 10.0  # the delivery timeout: the sends are still pending when the process dies
    first = BudgetPublisher(settings(tmp_path), spool_dir=tmp_path / "spool")
    await first.start()
    broker.up = False
    for i in range(20):
        await call(first, f"c-{i}")
    await crash(first)
    broker.up = True
    second = BudgetPublisher(settings(tmp_path), spool_dir=tmp_path / "spool")
    await second.start()
    try:
        await until(lambda: broker.usage_keys() == {f"c-{i}" for i in range(20)}, what="every accepted event")
        await until(lambda: second.spool_bytes() == 0, what="the spool emptied")
    finally:
        await second.stop()


async def test_spool_full_does_not_stop_the_send_loop(tmp_path: Path, broker: FakeBroker) -> None:
    """The broker stays away until the spool is full: SpoolFull reaches the caller, never the send loop; once
    the broker is back, every accepted event is delivered and ``on_full=block`` does not hang."""
    publisher = BudgetPublisher(settings(tmp_path, spool_max_bytes=1 << 16), buffer_max=4, spool_dir=tmp_path / "spool")
    await publisher.start()
    try:
        broker.up = False
        accepted: list[str] = []
        refused = 0
        tried = 0
        i = 0
        # Usage goes on until the spool refused some and the send loop tried 20 more sends with it full.
        deadline = time.monotonic() + 20
        while refused < 5 or broker.attempts < tried + 20:
            assert time.monotonic() < deadline, f"the send loop stopped sending ({broker.attempts} sends)"
            i += 1
            handle = RequestHandle(f"f-{i}", 0, datetime.now(UTC), ("team:a",), "gpt-4o", "openai", "cloud")
            try:
                await publisher.publish_usage(handle, Usage(input_tokens=10, output_tokens=5))
            except SpoolFull:
                refused += 1
                tried = tried or broker.attempts
            else:
                accepted.append(f"f-{i}")
            await asyncio.sleep(0.002)  # a gateway's pace
        assert all(not t.done() for t in publisher._tasks if t.get_name() == "publisher-send"), "the send loop died"
        publisher.on_full = "block"  # each request waits for room in the buffer, which only a live send loop makes
        broker.up = True
        for j in range(10):
            await asyncio.wait_for(
                publisher.publish_request(
                    request_id=f"b-{j}",
                    model="gpt-4o",
                    provider="openai",
                    backend="cloud",
                    input_bytes=10,
                    max_tokens=10,
                ),
                10,
            )
        await until(lambda: broker.usage_keys() >= set(accepted), what="every accepted event delivered")
        await until(lambda: publisher.spool_bytes() == 0, what="the spool emptied")
        for j in range(10):
            await call(publisher, f"after-{j}")
        await until(lambda: broker.usage_keys() >= {f"after-{j}" for j in range(10)}, what="new events delivered")
        await until(lambda: publisher.spool_bytes() == 0, what="the spool emptied")
    finally:
        await publisher.stop()


async def test_spool_writes_and_new_segments_are_fsynced(
    tmp_path: Path, broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: set[int] = set()
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    broker.acks = False  # nothing acknowledged: the events stay in the spool
    spool_dir = tmp_path / "spool"
    publisher = BudgetPublisher(settings(tmp_path), buffer_max=1, spool_dir=spool_dir)
    await publisher.start()
    try:
        for i in range(3):
            await call(publisher, f"s-{i}")
        segments = list(spool_dir.glob("spool-*"))
        assert segments
        inodes = {p.stat().st_ino for p in segments}
        await until(lambda: inodes <= synced, what="the segment files fsynced")
        await until(lambda: spool_dir.stat().st_ino in synced, what="the spool directory fsynced (new entries)")
    finally:
        broker.release()
        await publisher.stop()


async def test_the_publisher_starts_and_serves_while_the_broker_is_away(tmp_path: Path, broker: FakeBroker) -> None:
    broker.up = False
    publisher = BudgetPublisher(settings(tmp_path), buffer_max=3, spool_dir=tmp_path / "spool")
    await asyncio.wait_for(publisher.start(), 5)
    try:
        for i in range(10):
            await call(publisher, f"a-{i}")
        assert publisher.counts["usage_spooled"] > 0
        broker.up = True
        await until(lambda: broker.usage_keys() == {f"a-{i}" for i in range(10)}, what="delivery once it is back")
    finally:
        await publisher.stop()


def test_the_sync_publisher_writes_ahead_too(tmp_path: Path, broker: FakeBroker) -> None:
    from budgetflow.streams.gateway.sync_publisher import SyncBudgetPublisher

    broker.acks = False
    with SyncBudgetPublisher(settings(tmp_path), spool_dir=tmp_path / "spool") as publisher:
        handle = publisher.publish_request(
            request_id="y-1", model="gpt-4o", provider="openai", backend="cloud", input_bytes=10, max_tokens=10
        )
        publisher.publish_usage(handle, Usage(input_tokens=10, output_tokens=5))
        assert any((tmp_path / "spool").glob("spool-*")), "not acknowledged yet: in the spool"
        publisher._loop.call_soon_threadsafe(broker.release)  # the broker acknowledges, on the publisher's loop
    assert not list((tmp_path / "spool").glob("spool-*")), "acknowledged, then deleted at close"
