"""The notifier posts each budget transition once to a webhook, through webhook errors, a SIGKILL and a
restart, and the aggregate's re-announcements."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from aiohttp import web

pytestmark = pytest.mark.timeout(400)


async def test_each_transition_is_posted_once_across_restarts(pipeline_factory: Any, kit: Any) -> None:
    received: list[tuple[str, dict[str, Any]]] = []
    calls = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls in (1, 2, 4):  # a webhook having a bad moment: retried, not lost
            return web.Response(status=503 if calls != 4 else 429)
        received.append((request.headers["Idempotency-Key"], await request.json()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook/{secret}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        pipeline, scenario = await kit.start(
            pipeline_factory,
            extra_env={
                "BUDGETFLOW_NOTIFY__WEBHOOK_URL": f"http://127.0.0.1:{port}/hook/T000-SECRET",
                "BUDGETFLOW_NOTIFY__MAX_BACKOFF_S": "0.5",
            },
        )
        pipeline.start("enrich")
        aggregate = pipeline.start("aggregate")
        notifier = pipeline.start("notify", crash_at="notify.before_post:3")
        await pipeline.produce(scenario.records[: len(scenario.records) // 2])
        deadline = time.monotonic() + 60
        while notifier.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert notifier.proc.returncode == -9, notifier.tail()  # killed before its third post
        notifier = pipeline.start("notify")
        aggregate.kill()  # its replacement re-announces the transitions of the month it recovers
        await pipeline.produce(scenario.records[len(scenario.records) // 2 :])
        aggregate = pipeline.start("aggregate")
        await kit.settle(pipeline, scenario)
        await asyncio.sleep(2)
        notifier.stop()  # a controlled restart, mid-way
        assert notifier.proc.returncode == 0, notifier.tail()
        notifier = pipeline.start("notify")

        async def event_keys() -> set[str]:
            return {k.decode() for _, k, v, _ in await pipeline.records(pipeline.topics.events.name) if v}

        deadline = time.monotonic() + 60
        keys: set[str] = set()
        while time.monotonic() < deadline:
            keys = await event_keys()
            if keys and {k for k, _ in received} >= keys:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # room for a duplicate to show up
        posted = [k for k, _ in received]
        assert len(posted) == len(set(posted)), f"posted twice: {sorted(k for k in posted if posted.count(k) > 1)}"
        assert set(posted) == await event_keys()
        assert any(k.endswith(":hard_limit") for k in posted)
        for key, body in received:
            budget, period, event = key.rsplit(":", 2)
            assert body["budgetflow"]["budget_id"] == budget
            assert body["budgetflow"]["event"] == event
            assert budget in body["text"]
            assert period in body["text"]
        logs = pipeline.logs()
        assert "retrying" in logs  # the 503s and the 429 were retried
        assert "T000-SECRET" not in logs
        assert notifier.alive
        assert orjson.dumps(received)  # the bodies are plain JSON
    finally:
        await runner.cleanup()
