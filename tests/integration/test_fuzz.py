"""Hostile input at scale: hypothesis writes bad bytes straight onto the input topics, beside good traffic.
No worker dies, every bad record is in the DLQ with a reason, every good one counts. Bad policies are refused
before anything is published."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(600)

VALID_USAGE = {
    "v": 1,
    "request_id": "u",
    "request_occurred_at": "2026-11-30T21:00:00Z",
    "occurred_at": "2026-11-30T21:00:01Z",
    "budgets": ["team:a"],
    "model": "test-small",
    "provider": "testco",
    "backend": "cloud",
    "outcome": "completed",
    "input_tokens": 10,
    "output_tokens": 5,
}
VALID_REQUEST = {
    "v": 1,
    "request_id": "q",
    "occurred_at": "2026-11-30T21:00:00Z",
    "budgets": ["team:a"],
    "model": "test-small",
    "provider": "testco",
    "backend": "cloud",
    "prompt": "hi",
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
# Mutations that always break an event: each replaces one field with something no reader may accept.
breaking = st.sampled_from(
    [
        ("v", 2),
        ("v", "1"),
        ("v", None),
        ("request_id", ""),
        ("request_id", "x" * 300),
        ("request_id", 7),
        ("budgets", ["Bad Budget"]),
        ("budgets", "team:a"),
        ("budgets", [""]),
        ("model", ""),
        ("model", None),
        ("backend", "edge"),
        ("backend", 1),
        ("occurred_at", "1969-12-31T23:59:59Z"),
        ("occurred_at", "not a date"),
        ("occurred_at", "2026-11-30T21:00:00"),
        ("occurred_at", "9999-12-31T23:59:59Z"),
        ("occurred_at", 1764536400),
        ("input_tokens", -1),
        ("input_tokens", 10**15),
        ("input_tokens", 1.5),
        ("input_tokens", "10"),
        ("output_tokens", -7),
        ("output_tokens", True),
        ("cached_input_tokens", 11),
        ("reasoning_tokens", 6),
        ("outcome", "maybe"),
        ("attempt", -1),
        ("attempt", 2.0),
        ("request_occurred_at", "2026-02-30T00:00:00Z"),
    ]
)


@st.composite
def bad_record(draw: Any) -> tuple[str, bytes]:
    """(requests|usage, bytes) that no version-1 reader may accept."""
    kind = draw(st.sampled_from(["requests", "usage"]))
    base = VALID_REQUEST if kind == "requests" else VALID_USAGE
    choice = draw(st.integers(0, 8))
    if choice == 0:  # random bytes that are not a JSON object
        raw = draw(st.binary(max_size=200))
        if raw.strip().startswith(b"{"):
            raw = b"\xff" + raw
        return kind, raw
    if choice == 1:  # random JSON: anything but an event
        value = draw(json_values)
        return kind, orjson.dumps(value if not isinstance(value, dict) else {"junk": value})
    if choice == 2:  # nesting deeper than any parser allows
        depth = draw(st.integers(1100, 5000))
        return kind, b"[" * depth + b"]" * depth
    if choice == 3:  # NaN and Infinity are not JSON
        token = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"]))
        return kind, orjson.dumps(base)[:-1] + b',"input_tokens":' + token + b"}"
    if choice == 4:  # duplicate keys: the last one is a version nobody reads
        return kind, orjson.dumps(base)[:-1] + b',"v":2}'
    if choice == 5:  # a huge string where a short name belongs
        return kind, orjson.dumps({**base, "model": "m" * draw(st.integers(300, 200_000))})
    if choice == 6:  # lone surrogates and other unicode that is not UTF-8
        return kind, orjson.dumps(base)[:-1] + b',"model":"\\ud800' + draw(st.sampled_from([b"", b"x"])) + b'"}'
    field, value = draw(breaking)  # one field of a good event broken
    event = dict(base)
    event[field] = value
    if (
        field
        in (
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "reasoning_tokens",
            "outcome",
            "request_occurred_at",
        )
        and kind == "requests"
    ):
        event = {**VALID_USAGE, field: value}
        kind = "usage"
    return kind, orjson.dumps(event)


@pytest.mark.slow
@settings(
    max_examples=1, deadline=None, phases=[Phase.generate], database=None, suppress_health_check=list(HealthCheck)
)
@given(bad=st.lists(bad_record(), min_size=1500, max_size=1500))
def test_fuzzed_input_never_crashes_and_never_counts(
    pipeline_factory: Any, kit: Any, bad: list[tuple[str, bytes]]
) -> None:
    asyncio.run(_run(pipeline_factory, kit, bad))


async def _run(pipeline_factory: Any, kit: Any, bad: list[tuple[str, bytes]]) -> None:
    import random

    pipeline, scenario = await kit.start(pipeline_factory, n=400)
    topics = pipeline.topics
    names = {"requests": topics.requests.name, "usage": topics.usage.name}
    mixed = list(scenario.records)
    rng = random.Random(11)
    for kind, raw in bad:
        mixed.insert(rng.randrange(len(mixed) + 1), (names[kind], b"fuzz", raw))
    enrich = pipeline.start("enrich")
    aggregate = pipeline.start("aggregate")
    await pipeline.produce(mixed)
    await kit.settle(pipeline, scenario)
    deadline = time.monotonic() + 120
    dead: list[Any] = []
    while time.monotonic() < deadline:
        dead = await pipeline.dead_letters()
        if len(dead) >= len(bad):
            break
        await asyncio.sleep(1)
    assert enrich.alive, pipeline.logs()
    assert aggregate.alive, pipeline.logs()
    assert len(dead) == len(bad)
    from budgetflow.schemas.serde import REASONS

    for headers, _, _ in dead:
        assert headers["budgetflow.stage"] == b"enrich"
        assert headers["budgetflow.reason"].decode() in REASONS
        assert headers["budgetflow.error"]
    states = await pipeline.period_states()
    assert {k: s.settled for k, s in states.items()} == scenario.settled


def test_bad_policies_are_refused_before_anything_is_published(pipeline_factory: Any, kit: Any, tmp_path: Path) -> None:
    pipeline = pipeline_factory(clock_start=kit.START.isoformat(), speed=1.0)
    assert pipeline.cli("topics", "create").returncode == 0
    cases = {
        # Numbers are read exactly as written (10.5 is $10.50); one past the sixth decimal is refused.
        "seven decimals": 'budgets:\n  - {id: "ok:1", monthly_limit_usd: 1}\n  - {id: "bad", monthly_limit_usd: 10.1234567}\n',
        "soft 100": 'budgets:\n  - {id: "ok:1", monthly_limit_usd: "1"}\n  - {id: "bad", soft_limit_percent: 100}\n',
        "unknown field": 'budgets:\n  - {id: "ok:1"}\n  - {id: "bad", hard_limt_action: warn}\n',
        "bad id": 'budgets:\n  - {id: "ok:1"}\n  - {id: "Not Valid"}\n',
        "negative": 'budgets:\n  - {id: "ok:1"}\n  - {id: "bad", monthly_limit_usd: "-5"}\n',
        "not yaml": "budgets: [\n",
        "duplicate": 'budgets:\n  - {id: "ok:1"}\n  - {id: "ok:1"}\n',
    }
    for name, text in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.yaml"
        path.write_text(text)
        proc = pipeline.cli("policy", "apply", str(path))
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
    records = asyncio.run(pipeline.records(pipeline.topics.policies.name))
    assert records == [], "nothing was published, not even the good entries"
