"""The gateway publisher with the broker away: requests follow on_full, usage is spooled, nothing is lost."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(400)


def fresh(state: Any) -> bool:
    """The view holds a status of the budget, and its partition's heartbeat is recent."""
    return bool(state.seen and not state.stale)


async def test_publisher_keeps_serving_while_the_broker_is_down(
    pipeline_factory: Any, kit: Any, tmp_path: Path
) -> None:
    from budgetflow.schemas.settings import LocalKafkaSettings
    from budgetflow.streams import BudgetPublisher, BudgetView, Usage
    from budgetflow.streams.dev.localkafka import LocalKafka

    # A broker of its own: this test stops it.
    broker = LocalKafka(tmp_path / "broker", LocalKafkaSettings(port=0))
    bootstrap = await asyncio.to_thread(broker.start)
    try:
        now = datetime.now(UTC)
        pipeline = pipeline_factory(
            bootstrap=bootstrap,
            clock_start=now.isoformat(),
            speed=1.0,
            extra_env={
                "BUDGETFLOW_PUBLISHER__DELIVERY_TIMEOUT_MS": "3000",
                "BUDGETFLOW_PUBLISHER__BUFFER_MAX": "50",
                "BUDGETFLOW_PUBLISHER__REPLAY_INTERVAL_S": "0.5",
                "BUDGETFLOW_HEARTBEAT_S": "0.5",
                "BUDGETFLOW_VIEW__STALE_AFTER_S": "3",
                "BUDGETFLOW_VIEW__EXPIRE_AFTER_S": "600",
            },
        )
        assert pipeline.cli("topics", "create").returncode == 0
        pipeline.start("enrich")
        pipeline.start("aggregate")
        usages: list[tuple[str, dict[str, Any]]] = []
        view = BudgetView(pipeline.settings())
        await view.start()
        async with BudgetPublisher(pipeline.settings(), spool_dir=tmp_path / "spool") as publisher:

            async def call(i: int) -> Any:
                handle = await publisher.publish_request(
                    request_id=f"p-{i}",
                    model="test-small",
                    provider="testco",
                    backend="cloud",
                    budgets=["team:a"],
                    messages=[{"role": "user", "content": f"hello {i}"}],
                    max_tokens=100,
                    occurred_at=now,
                )
                usage = Usage(input_tokens=100 + i, output_tokens=50)
                await publisher.publish_usage(handle, usage)
                usages.append(
                    (
                        "usage",
                        {
                            "request_id": f"p-{i}",
                            "attempt": 0,
                            "request_occurred_at": now.isoformat(),
                            "budgets": ["team:a"],
                            "model": "test-small",
                            "input_tokens": 100 + i,
                            "cached_input_tokens": 0,
                            "cache_write_input_tokens": 0,
                            "output_tokens": 50,
                            "reasoning_tokens": 0,
                        },
                    )
                )
                return handle

            for i in range(100):
                await call(i)
            await publisher.flush()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(await pipeline.period_states()) < 2:
                await asyncio.sleep(0.5)  # the workers are up and counting
            # ready() means caught up to where the topics were when the view started (empty, here): it says
            # nothing of team:a's first status, which the view reads a fetch later. Wait for that status itself.
            await view.ready(timeout_s=60)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not fresh(view.status("team:a")):
                await asyncio.sleep(0.2)
            assert view.status("team:a").seen
            assert not view.status("team:a").stale
            broker.kill()  # kill -9 the broker
            began = time.monotonic()
            handles = [await call(i) for i in range(100, 400)]
            elapsed = time.monotonic() - began
            # It kept serving, fast, with bounded memory: once the buffer filled, requests were refused for
            # cloud (on_full=reject_cloud) and usage went to the spool.
            assert elapsed < 10, f"publishing blocked for {elapsed:.1f} s"
            assert publisher.buffered <= 50
            assert any(not h.cloud_allowed for h in handles)
            assert publisher.counts["requests_rejected_cloud"] > 0
            assert publisher.counts["usage_spooled"] > 0
            assert publisher.spool_bytes() > 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not view.status("team:a").stale:
                await asyncio.sleep(0.2)
            assert view.status("team:a").stale, "no heartbeats while the broker is down: the view says so"
            await asyncio.to_thread(broker.start)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and (publisher.spool_bytes() or publisher.buffered):
                await asyncio.sleep(0.5)
            assert publisher.spool_bytes() == 0, publisher.counts
            await publisher.flush()
            # The workers reconnected by themselves: heartbeats flow again, and the view is fresh.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and view.status("team:a").stale:
                await asyncio.sleep(0.5)
            assert not view.status("team:a").stale, pipeline.logs()
        await view.stop()
        # Every usage counts exactly once, however often it was retried.
        expected = kit.expected_of(usages)
        deadline = time.monotonic() + 120
        states: dict[Any, Any] = {}
        while time.monotonic() < deadline:
            states = await pipeline.period_states()
            if {k: s.settled for k, s in states.items()} == expected.settled:
                break
            await asyncio.sleep(1)
        assert {k: s.settled for k, s in states.items()} == expected.settled, pipeline.logs()
        assert {k: s.requests for k, s in states.items()} == expected.requests
    finally:
        broker.stop()
