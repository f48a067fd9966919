"""Bad input goes to the DLQ with its reason, redacted; every good record beside it still counts."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.timeout(600)

SECRET = "TOP-SECRET-PROMPT-7f3a"


def _request(i: int, **overrides: Any) -> dict[str, Any]:
    base = {
        "v": 1,
        "request_id": f"bad-{i}",
        "occurred_at": "2026-11-30T21:00:00Z",
        "budgets": ["team:a"],
        "model": "test-small",
        "provider": "testco",
        "backend": "cloud",
        "messages": [{"role": "user", "content": f"{SECRET} number {i}"}],
    }
    base.update(overrides)
    return base


def _usage(i: int, **overrides: Any) -> dict[str, Any]:
    base = {
        "v": 1,
        "request_id": f"bad-{i}",
        "request_occurred_at": "2026-11-30T21:00:00Z",
        "occurred_at": "2026-11-30T21:00:01Z",
        "model": "test-small",
        "provider": "testco",
        "backend": "cloud",
        "outcome": "completed",
        "input_tokens": 10,
        "output_tokens": 5,
    }
    base.update(overrides)
    return base


def malformed(i: int, rng: random.Random) -> tuple[str, bytes | None, str]:
    """One malformed record: (requests|usage, raw value, expected reason)."""
    cases: list[tuple[str, bytes | None, str]] = [
        ("requests", f'{{"v":1,"request_id":"x","messages":[{{"content":"{SECRET}"'.encode(), "json"),
        ("requests", b"[1, 2, 3]", "not_object"),
        ("requests", None, "empty"),
        ("requests", orjson.dumps(_request(i, v=2)), "version"),
        ("requests", orjson.dumps(_request(i, max_tokens="lots")), "invalid"),
        ("requests", orjson.dumps(_request(i, request_id="")), "invalid"),
        ("requests", orjson.dumps(_request(i, budgets=["Not A Budget!"])), "invalid"),
        ("requests", orjson.dumps(_request(i, occurred_at="1969-07-20T20:17:00Z")), "invalid"),
        ("requests", orjson.dumps(_request(i, occurred_at="yesterday")), "invalid"),
        ("requests", orjson.dumps(_request(i, messages=[{"role": None, "content": SECRET}])), "invalid"),
        ("requests", orjson.dumps({k: v for k, v in _request(i).items() if k != "request_id"}), "invalid"),
        ("requests", f'{{"v":1,"request_id":"n","max_tokens":NaN,"prompt":"{SECRET}"}}'.encode(), "json"),
        ("requests", ("[" * 5000 + "]" * 5000).encode(), "json"),
        ("usage", orjson.dumps(_usage(i, input_tokens=-5)), "out_of_range"),
        ("usage", orjson.dumps(_usage(i, output_tokens=10**15)), "out_of_range"),
        ("usage", orjson.dumps(_usage(i, cached_input_tokens=11)), "usage_rule"),
        ("usage", orjson.dumps(_usage(i, output_tokens=5, reasoning_tokens=6)), "usage_rule"),
        ("usage", orjson.dumps(_usage(i, outcome="exploded")), "invalid"),
        ("usage", orjson.dumps(_usage(i, input_tokens=1.5)), "invalid"),
        ("usage", b'{"v":1,"request_id":"u","input_tokens":1e400}', "json"),
        ("usage", orjson.dumps(_usage(i, v=1, request_occurred_at="2026-13-01T00:00:00Z")), "invalid"),
    ]
    return rng.choice(cases)


@pytest.mark.slow
async def test_malformed_records_go_to_the_dlq_and_good_ones_count(pipeline_factory: Any, kit: Any) -> None:
    pipeline, scenario = await kit.start(pipeline_factory, n=600)
    rng = random.Random(99)
    bad: list[tuple[str, bytes | None, str]] = [malformed(i, rng) for i in range(2000)]
    mixed: list[tuple[str, bytes | None, bytes | None]] = list(scenario.records)
    for topic, value, _ in bad:
        name = pipeline.topics.requests.name if topic == "requests" else pipeline.topics.usage.name
        mixed.insert(rng.randrange(len(mixed) + 1), (name, b"bad-key", value))
    enrich = pipeline.start("enrich")
    aggregate = pipeline.start("aggregate")
    await pipeline.produce(mixed)
    await kit.settle(pipeline, scenario)
    # Entries for a month closed long ago are late: dead letters of the aggregate, not spend.
    old = (kit.START - timedelta(days=45)).isoformat()
    late = [
        (
            pipeline.topics.usage.name,
            b"late",
            orjson.dumps(_usage(10_000 + i, request_occurred_at=old, budgets=["team:a"])),
        )
        for i in range(5)
    ]
    await pipeline.produce(late)

    deadline = time.monotonic() + 90
    dead: list[Any] = []
    while time.monotonic() < deadline:
        dead = await pipeline.dead_letters()
        if len(dead) >= len(bad) + len(late) * 2:
            break
        await asyncio.sleep(1)
    assert enrich.alive, enrich.tail()
    assert aggregate.alive, aggregate.tail()
    by_stage: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for headers, _key, value in dead:
        stage = headers["budgetflow.stage"].decode()
        by_stage[stage] = by_stage.get(stage, 0) + 1
        reason = headers["budgetflow.reason"].decode()
        reasons[reason] = reasons.get(reason, 0) + 1
        assert headers["budgetflow.source.topic"].decode().startswith(pipeline.prefix)
        assert int(headers["budgetflow.source.offset"]) >= 0
        assert headers["budgetflow.error"]
        # No prompt text anywhere in the DLQ: not in the value, not in a header.
        assert SECRET.encode() not in (value or b"")
        assert all(SECRET.encode() not in v for v in headers.values())
    assert by_stage == {"enrich": len(bad), "aggregate": len(late) * 2}  # late usage: team:a and global
    expected: dict[str, int] = {}
    for _, _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    expected["late"] = len(late) * 2
    assert reasons == expected
    # The good records around them are exact (settle() checked the sums; late ones changed nothing).
    states = await pipeline.period_states()
    assert {k: s.settled for k, s in states.items()} == scenario.settled
