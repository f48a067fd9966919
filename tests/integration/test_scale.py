"""Scale-out on one machine: two enrich and two aggregate workers on 8 partitions; one aggregate worker is
stopped mid-scenario and the other takes over its partitions and their state. Totals stay exact, and the
per-budget metrics come from exactly one worker each, before and after, so sums in PromQL never double."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(400)


async def owners(pipeline: Any, want: int) -> set[str]:
    from budgetflow.streams.ops.readback import read_heartbeats

    deadline = time.monotonic() + 60
    found: set[str] = set()
    while time.monotonic() < deadline:
        beats = await read_heartbeats(pipeline.settings(), pipeline.topics.heartbeats.name)
        recent = time.time() - 3
        found = {b.owner for b in beats.values() if b.owner and b.as_of.timestamp() > recent}
        if len(found) == want:
            return found
        await asyncio.sleep(0.5)
    raise AssertionError(f"expected {want} workers owning partitions, saw {found}")


async def budget_series(url: str, name: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    return {
        sample.labels["budget"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


async def test_one_of_two_aggregates_stops_and_the_other_takes_over(pipeline_factory: Any, kit: Any) -> None:
    # The clock runs an hour a second and the second half is produced only after the takeover, which takes
    # tens of seconds on a busy machine: keep the dedupe horizon and the month's grace longer than the test, so
    # what it measures is the takeover, never a late entry (lateness has its own tests).
    month = str(31 * 86_400)
    pipeline, scenario = await kit.start(
        pipeline_factory,
        partitions=8,
        extra_env={"BUDGETFLOW_DEDUPE_HORIZON_S": month, "BUDGETFLOW_PERIOD_GRACE_S": month},
    )
    enrich = [pipeline.start("enrich", data=f"enrich-{i}") for i in range(2)]
    first = pipeline.start("aggregate", data="agg-a")
    second = pipeline.start("aggregate", data="agg-b")
    half = len(scenario.records) // 2
    await pipeline.produce(scenario.records[:half])
    both = await owners(pipeline, 2)
    # Each budget's gauges come from the one worker that owns its partition (which worker that is depends on
    # the assignor; with round robin one of the two may own every budget with a policy).
    policy_budgets = set(kit.LIMITS)
    deadline = time.monotonic() + 60
    exported: list[set[str]] = []
    while time.monotonic() < deadline:
        exported = [set(await budget_series(url, "budgetflow_budget_requests")) for url in sorted(both)]
        if exported[0] | exported[1] >= policy_budgets:
            break
        await asyncio.sleep(1)
    assert exported[0] | exported[1] >= policy_budgets, exported
    assert not exported[0] & exported[1], "a budget exported by both workers would double in sum by (budget)"

    second.stop()  # a controlled stop: it leaves the group, the first takes its 4 partitions and their state
    assert second.proc.returncode == 0, second.tail()
    await pipeline.produce(scenario.records[half:])
    states = await kit.settle(pipeline, scenario)
    kit.check_counts(states, scenario)
    assert first.alive
    assert all(w.alive for w in enrich)

    (survivor,) = await owners(pipeline, 1)
    period = max(p for _, p in scenario.requests)
    expected = {b: n for (b, p), n in scenario.requests.items() if p == period}
    deadline = time.monotonic() + 30
    got: dict[str, float] = {}
    while time.monotonic() < deadline:
        got = await budget_series(survivor, "budgetflow_budget_requests")
        if {b: got.get(b) for b in expected} == expected:
            break
        await asyncio.sleep(1)
    assert {b: got.get(b) for b in expected} == expected
    settled = await budget_series(survivor, "budgetflow_budget_settled_usd")
    for budget, pico in ((b, s) for (b, p), s in scenario.settled.items() if p == period):
        assert settled[budget] == pytest.approx(pico / 1e12, rel=1e-12, abs=1e-12), budget


async def test_partitions_cannot_change_in_place(pipeline_factory: Any, kit: Any) -> None:
    import subprocess
    import sys
    from pathlib import Path

    pipeline, _ = await kit.start(pipeline_factory, n=10, partitions=4)
    env = {**pipeline.env_base, "BUDGETFLOW_TOPICS__PARTITIONS": "8"}
    script = str(Path(sys.executable).with_name("budgetflow"))
    proc = await asyncio.to_thread(
        subprocess.run, [script, "topics", "create"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert "has 4 partitions, budgetflow expects 8" in proc.stderr, proc.stderr
    assert "cannot change in place" in proc.stderr
