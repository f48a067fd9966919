"""Sharded budgets through the real pipeline: exact under kill -9 at each of the aggregate's crash points in a
batch, with two aggregate workers owning the shards' partitions between them, and one status per budget for
routers.

The kit's scenario, with ``team:b`` sharded four ways and ``global`` three ways (``GLOBAL_SHARDS``): the totals
of each budget's home record must equal the scenario's, computed from the events alone, to the pico-dollar; the
status topic carries statuses of budgets only (never of a shard), and each sharded budget's last status says
its exact spend.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

SHARDED = "team:b"


def _policies(kit: Any) -> str:
    text = kit.POLICIES.replace('  - id: "team:b"\n', '  - id: "team:b"\n    shards: 4\n')
    assert "shards: 4" in text
    return text


async def _last_statuses(pipeline: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for _, key, value, _ in await pipeline.records(pipeline.topics.status.name):
        if key is not None and value is not None:
            out[key.decode()] = orjson.loads(value)
    return out


async def _statuses_say(pipeline: Any, scenario: Any, period: str) -> dict[str, dict[str, Any]]:
    """Wait until the last status of each sharded budget says the scenario's exact spend in ``period``."""
    want = {b: scenario.settled[(b, period)] for b in (SHARDED, "global")}
    deadline = time.monotonic() + 90
    statuses: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        statuses = await _last_statuses(pipeline)
        said = {b: statuses.get(b, {}) for b in want}
        if all(s.get("period") == period and _pico(s.get("spend_usd")) == want[b] for b, s in said.items()):
            return statuses
        await asyncio.sleep(0.5)
    raise AssertionError(f"statuses never said the exact spend {want}: {statuses}\n{pipeline.logs()}")


def _pico(usd: str | None) -> int | None:
    from budgetflow.schemas.money import parse_usd

    return None if usd is None else parse_usd(usd)


CRASHES = [
    "aggregate.after_apply:3",
    "aggregate.mid_batch:3",
    "aggregate.mid_changelog:4",
    "aggregate.after_flush:5",
    "aggregate.before_commit:6",
]


@pytest.mark.slow
@pytest.mark.parametrize("crash", CRASHES)
async def test_kill_9_with_sharded_budgets_changes_nothing(pipeline_factory: Any, kit: Any, crash: str) -> None:
    pipeline, scenario = await kit.start(
        pipeline_factory,
        policies=_policies(kit),
        extra_env={"BUDGETFLOW_WORKER__MAX_BATCH_RECORDS": "200", "BUDGETFLOW_GLOBAL_SHARDS": "3"},
    )
    pipeline.start("enrich")
    # Two aggregates: the shards' partitions and their budgets' homes are split between them.
    workers = {
        "a": pipeline.start("aggregate", data="agg-a", crash_at=crash),
        "b": pipeline.start("aggregate", data="agg-b"),
    }
    producing = asyncio.create_task(pipeline.produce(scenario.records))
    crashed = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (crashed and producing.done()):
        if not workers["a"].alive:
            assert workers["a"].proc.returncode == -9, workers["a"].tail()
            crashed = True
            workers["a"] = pipeline.start("aggregate", data="agg-a")
        await asyncio.sleep(0.2)
    await producing
    assert crashed, f"{crash} never reached\n{pipeline.logs()}"
    states = await kit.settle(pipeline, scenario)
    kit.check_counts(states, scenario)
    every = await pipeline.period_states()
    shards = {budget for budget, _ in every if "#" in budget}
    assert {s.split("#")[0] for s in shards} == {SHARDED, "global"}, shards  # the entries went to the shards
    assert len(shards) == 7
    statuses = await _statuses_say(pipeline, scenario, "2026-12")
    assert not [key for key in statuses if "#" in key], "a shard's status reached routers"
    limit = kit.LIMITS[SHARDED]
    spend = scenario.settled[(SHARDED, "2026-12")]
    expected = "hard_limit" if spend >= limit else "soft_limit" if spend * 100 >= limit * 75 else "normal"
    assert statuses[SHARDED]["status"] == expected
