"""The gateway publisher SIGKILLed at random moments, the broker away and back: every usage event counts once.

A gateway (a child process) publishes usage events without pause and writes
down each one ``publish_usage`` accepted; it is killed with SIGKILL at random
moments: the broker up, the broker SIGKILLed under it, the broker away, the
broker restarting and back; it is started again each time on the same spool
dir. At the end every
accepted event is on the usage topic, and the real enrich and aggregate
workers have counted each event on it exactly once. ``BUDGETFLOW_TEST_SEED``
replays a schedule of kills.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.timeout(300)

# The gateway: usage only (a usage event settles its request alone), one every few milliseconds, each written
# down once publish_usage returned. Its line-buffered writes reach the kernel before the next event, so a
# SIGKILL loses none of them.
GATEWAY = """
import asyncio, sys
from datetime import datetime
from budgetflow.streams import BudgetPublisher, RequestHandle, Usage

async def main() -> None:
    first, report, occurred = int(sys.argv[1]), sys.argv[2], datetime.fromisoformat(sys.argv[3])
    publisher = BudgetPublisher()
    await publisher.start()
    with open(report, "a", buffering=1) as out:
        out.write(f"up {first}\\n")
        i = first
        while True:
            handle = RequestHandle(f"k-{i}", 0, occurred, ("team:a",), "test-small", "testco", "cloud")
            await publisher.publish_usage(handle, Usage(input_tokens=100 + i % 997, output_tokens=50))
            out.write(f"done {i}\\n")
            i += 1
            await asyncio.sleep(0.004)

asyncio.run(main())
"""


def usage_event(i: int, occurred: str) -> dict[str, Any]:
    """What the gateway publishes for number ``i``, as the expectation reads it."""
    return {
        "request_id": f"k-{i}",
        "attempt": 0,
        "request_occurred_at": occurred,
        "budgets": ["team:a"],
        "model": "test-small",
        "input_tokens": 100 + i % 997,
        "cached_input_tokens": 0,
        "cache_write_input_tokens": 0,
        "output_tokens": 50,
        "reasoning_tokens": 0,
    }


class Gateway:
    """The gateway child processes, one at a time, and what they accepted."""

    def __init__(self, env: dict[str, str], report: Path, occurred: datetime) -> None:
        self.env, self.report, self.occurred = env, report, occurred
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.kills = 0
        self.log = report.with_suffix(".log")

    def accepted(self) -> list[int]:
        out = []
        for line in self.report.read_text().splitlines() if self.report.exists() else []:
            kind, _, number = line.partition(" ")
            if kind == "done" and number.isdigit():
                out.append(int(number))
        return out

    async def start(self) -> None:
        """A new gateway on the same spool; returns once it has accepted an event."""
        self.generation += 1
        first = self.generation * 1_000_000
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", GATEWAY, str(first), str(self.report), self.occurred.isoformat()],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while not any(n >= first for n in self.accepted()):
            assert self.proc.poll() is None, f"the gateway died by itself:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the gateway never published:\n{self.log.read_text()[-3000:]}"
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        assert self.proc.poll() is None, f"the gateway died by itself:\n{self.log.read_text()[-3000:]}"
        self.proc.kill()  # SIGKILL: no stop(), no flush, no cleanup
        self.proc.wait(timeout=30)
        self.kills += 1


async def test_every_usage_event_counts_once_whenever_the_gateway_is_killed(
    pipeline_factory: Any, kit: Any, tmp_path: Path
) -> None:
    from budgetflow.schemas.settings import LocalKafkaSettings
    from budgetflow.streams import BudgetPublisher
    from budgetflow.streams.dev.localkafka import LocalKafka

    seed = int(os.environ.get("BUDGETFLOW_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    began = time.monotonic()
    broker = LocalKafka(tmp_path / "broker", LocalKafkaSettings(port=0))  # a broker of its own: this test kills it
    bootstrap = await asyncio.to_thread(broker.start)
    gateway: Gateway | None = None
    try:
        now = datetime.now(UTC)
        pipeline = pipeline_factory(
            bootstrap=bootstrap,
            clock_start=now.isoformat(),
            speed=1.0,
            extra_env={
                "BUDGETFLOW_PUBLISHER__DELIVERY_TIMEOUT_MS": "3000",
                "BUDGETFLOW_PUBLISHER__BUFFER_MAX": "50",
                "BUDGETFLOW_PUBLISHER__REPLAY_INTERVAL_S": "0.2",
            },
        )
        assert pipeline.cli("topics", "create").returncode == 0
        pipeline.start("enrich")
        pipeline.start("aggregate")
        spool = tmp_path / "gateway" / "spool"
        gateway = Gateway(
            {**pipeline.env_base, "BUDGETFLOW_DATA_DIR": str(tmp_path / "gateway")}, tmp_path / "accepted.txt", now
        )

        async def run_then_kill(low: float, high: float) -> None:
            await asyncio.sleep(rng.uniform(low, high))  # a random moment: this test's input, not a wait
            gateway.kill()

        await gateway.start()  # the broker is up
        await run_then_kill(0.2, 1.0)
        await gateway.start()
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        broker.kill()  # kill -9 the broker under a running gateway: what it sent is unacknowledged
        before_outage = len(gateway.accepted())
        await run_then_kill(0.2, 2.0)
        for _ in range(2):  # the broker is away
            await gateway.start()
            await run_then_kill(0.2, 1.5)
        during_outage = len(gateway.accepted()) - before_outage
        assert any(spool.glob("spool-*")), "nothing waits in the spool"
        await gateway.start()
        restart = asyncio.create_task(asyncio.to_thread(broker.start))  # it comes back while the gateway runs
        for _ in range(3):  # the broker coming back, then back
            await run_then_kill(0.3, 1.5)
            await gateway.start()
        await restart
        await run_then_kill(0.3, 1.5)
        accepted = set(gateway.accepted())

        # One more start on the same spool sends what is left.
        settings = pipeline.settings()
        async with BudgetPublisher(settings, spool_dir=spool) as publisher:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and (publisher.spool_bytes() or publisher.buffered):
                await asyncio.sleep(0.2)
            assert publisher.spool_bytes() == 0, publisher.counts
            skipped = publisher.counts["spool_lines_skipped"]

        # Every accepted event reached the topic; what reached it is what the gateway published.
        on_topic: dict[int, int] = {}
        for _, key, value, _ in await pipeline.records(pipeline.topics.usage.name):
            assert key is not None
            assert value is not None
            event = orjson.loads(value)
            number = int(key.decode().removeprefix("k-"))
            assert (event["request_id"], event["input_tokens"]) == (f"k-{number}", 100 + number % 997)
            on_topic[number] = on_topic.get(number, 0) + 1
        context = (
            f"seed {seed}: {len(accepted)} accepted ({during_outage} with the broker away), "
            f"{len(on_topic)} on the topic, {sum(on_topic.values())} records, {gateway.kills} kills"
        )
        assert accepted - on_topic.keys() == set(), f"accepted usage lost; {context}"
        assert during_outage > 0, context

        # Each counts once in the ledger: the aggregate's sums and counts are those of each event once.
        occurred = now.isoformat().replace("+00:00", "Z")
        expected = kit.expected_of([("usage", usage_event(i, occurred)) for i in on_topic])
        deadline = time.monotonic() + 120
        states: dict[Any, Any] = {}
        while time.monotonic() < deadline:
            states = await pipeline.period_states()
            if {k: s.settled for k, s in states.items()} == expected.settled:
                break
            await asyncio.sleep(0.5)
        assert {k: s.settled for k, s in states.items()} == expected.settled, f"{context}\n{pipeline.logs()}"
        assert {k: s.settles for k, s in states.items()} == expected.settles, context
        assert {k: s.requests for k, s in states.items()} == expected.requests, context
        sys.stderr.write(
            f"publisher crash test: {context}, {skipped} torn lines skipped, {time.monotonic() - began:.0f} s\n"
        )
    finally:
        if gateway is not None and gateway.proc is not None and gateway.proc.poll() is None:
            gateway.proc.kill()
        broker.stop()
