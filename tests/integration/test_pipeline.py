"""The pipeline on a real broker: exact to the pico-dollar, in order, across a month boundary, under kill -9."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from datetime import timedelta
from fractions import Fraction
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.timeout(600)


def utilization(status: dict[str, Any]) -> Fraction:
    return Fraction(int(status["spend_usd"].replace(".", "")), int(status["limit_usd"].replace(".", ""))) * 100


def check_status_order(records: list[tuple[int, bytes | None, bytes | None, int]], kit: Any) -> None:
    """Per budget and period, in topic order: each transition's spend is past its threshold and the previous
    record's is not; status is monotone in spend up to the hysteresis band."""
    by_budget: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _, _, value, _ in records:
        if value is not None:
            status = orjson.loads(value)
            by_budget.setdefault((status["budget_id"], status["period"]), []).append(status)
    rank = {"normal": 0, "soft_limit": 1, "hard_limit": 2}
    checked = 0
    for (budget, _), history in by_budget.items():
        if budget not in kit.LIMITS:
            continue
        soft = kit.SOFT.get(budget, 75)
        for before, after in itertools.pairwise(history):
            u_before, u_after = utilization(before), utilization(after)
            if rank[after["status"]] > rank[before["status"]]:
                threshold = 100 if after["status"] == "hard_limit" else soft
                assert u_after >= threshold > u_before, (budget, before, after)
                checked += 1
            elif rank[after["status"]] < rank[before["status"]]:
                threshold = 100 if before["status"] == "hard_limit" else soft
                assert u_after < threshold - 1, (budget, before, after)
        for status in history:
            u = utilization(status)
            assert status["status"] != "hard_limit" or u >= 99, status
            assert status["status"] != "normal" or u < soft, status
    assert checked > 0, "the scenario should cross thresholds"


async def start_in_the_clocks_month(pipeline: Any, kit: Any) -> None:
    """A tick stamped at the clock's start on every ledger partition: the ledger of an aggregate that was running
    before midnight.

    The simulated midnight comes four wall seconds after the clock's anchor (the pipeline's creation). Two CLI runs,
    the scenario and the workers' start have taken longer than that on a loaded machine (first ticks seen at 00:39,
    03:09 and 06:22 simulated), and the aggregate's first tick comes before any entry: a partition whose first record
    is a December tick holds no month to roll over from, and no rollover is published (rightly: routers roll over on
    read). The month boundary this test is about needs the partitions to have been in November, so they are.
    """
    from aiokafka import AIOKafkaProducer

    from budgetflow.schemas.events import LedgerEntry, period_of
    from budgetflow.schemas.serde import dumps
    from budgetflow.streams.kafka.clients import client_options

    producer = AIOKafkaProducer(**client_options(pipeline.settings().kafka), enable_idempotence=True)
    await producer.start()
    try:
        for p in range(pipeline.topics.ledger.partitions):
            tick = LedgerEntry(
                entry_id=f"tick:{p}:{kit.START.timestamp():.6f}",
                kind="tick",
                request_id="tick",
                period=period_of(kit.START),
                amount_pico_usd=0,
                occurred_at=kit.START,
            )
            await producer.send_and_wait(pipeline.topics.ledger.name, dumps(tick), key=b"tick", partition=p)
    finally:
        await producer.stop()


async def test_scenario_is_exact_ordered_and_rolls_over(pipeline_factory: Any, kit: Any) -> None:
    pipeline, scenario = await kit.start(pipeline_factory, n=2500)
    assert len(scenario.records) > 5000
    await start_in_the_clocks_month(pipeline, kit)
    pipeline.start("enrich")
    pipeline.start("aggregate")
    await pipeline.produce(scenario.records)
    states = await kit.settle(pipeline, scenario)
    kit.check_counts(states, scenario)
    assert states[("nov:only", "2026-11")].status == "hard_limit"
    records = await pipeline.records(pipeline.topics.status.name)
    check_status_order(records, kit)
    # Rollover without traffic: nov:only's last status is December's, normal, nothing spent.
    latest = {}
    for _, key, value, _ in records:
        if value is not None:
            latest[key] = orjson.loads(value)
    assert latest[b"nov:only"]["period"] == "2026-12"
    assert latest[b"nov:only"]["status"] == "normal"
    assert latest[b"nov:only"]["spend_usd"] == "0.000000000000"
    rollovers = [orjson.loads(v) for _, _, v, _ in records if v is not None and orjson.loads(v)["reason"] == "rollover"]
    assert {r["budget_id"] for r in rollovers} >= {"nov:only", "global", "team:a", "team:b", "key:k1"}
    # Each transition is announced once per budget, period and event.
    events = [k for _, k, _, _ in await pipeline.records(pipeline.topics.events.name)]
    assert b"nov:only:2026-11:hard_limit" in events
    assert len(events) == len(set(events)), "\n".join(
        v.decode() for _, _, v, _ in await pipeline.records(pipeline.topics.events.name)
    )
    # Every changelog record lands on its budget's ledger partition.
    from budgetflow.streams.aggregate.ledger import decode_key
    from budgetflow.streams.kafka.topics import partition_for

    changelog = await pipeline.records(pipeline.topics.state.name)
    assert changelog
    partitions = pipeline.topics.ledger.partitions
    for partition, key, _, _ in changelog:
        kind, parts = decode_key(key)
        if kind != "m":
            assert partition_for(parts[0], partitions) == partition, (key, partition)


async def test_a_lowered_limit_moves_the_status_without_a_restart(pipeline_factory: Any, kit: Any) -> None:
    # The clock stays in November, where team:b has spent something; the scenario's events are ten days ahead
    # of that clock, so the allowed clock skew is widened (else they are rightly `future`).
    pipeline, scenario = await kit.start(
        pipeline_factory,
        start=kit.START - timedelta(days=10),
        extra_env={"BUDGETFLOW_MAX_CLOCK_SKEW_S": str(30 * 86_400)},
    )
    pipeline.start("enrich")
    pipeline.start("aggregate")
    await pipeline.produce(scenario.records[:200])
    await asyncio.sleep(3)
    lowered = pipeline.root / "lowered.yaml"
    lowered.write_text(kit.POLICIES.replace('monthly_limit_usd: "2.00"', 'monthly_limit_usd: "0.000001"'))
    began = time.monotonic()
    proc = pipeline.cli("policy", "apply", str(lowered))
    assert proc.returncode == 0, proc.stderr
    assert "team:b" in proc.stdout
    while time.monotonic() - began < 30:
        records = await pipeline.records(pipeline.topics.status.name)
        mine = [orjson.loads(v) for _, k, v, _ in records if k == b"team:b" and v is not None]
        if mine and mine[-1]["limit_usd"] == "0.000001000000":
            assert mine[-1]["status"] == "hard_limit"
            assert mine[-1]["reason"] == "policy"
            assert mine[-1]["period"] == "2026-11"
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"status did not follow the lowered limit\n{pipeline.logs()}")


async def _run_with_crashes(
    pipeline: Any, scenario: Any, crashes: dict[str, str], kit: Any
) -> dict[tuple[str, str], Any]:
    """Run the scenario; each role crashes at its point once and is restarted clean."""
    workers = {role: pipeline.start(role, crash_at=crashes.get(role)) for role in ("enrich", "aggregate")}
    producing = asyncio.create_task(pipeline.produce(scenario.records))
    crashed: set[str] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (len(crashed) < len(crashes) or not producing.done()):
        for role, worker in workers.items():
            if not worker.alive:
                assert worker.proc.returncode == -9, f"{role} died without a crash point\n{worker.tail()}"
                crashed.add(role)
                workers[role] = pipeline.start(role)
        await asyncio.sleep(0.2)
    await producing
    assert crashed == set(crashes), f"crash points never reached: {set(crashes) - crashed}\n{pipeline.logs()}"
    return await kit.settle(pipeline, scenario)


CRASH_POINTS = [
    {"aggregate": "aggregate.after_apply:3"},
    {"aggregate": "aggregate.mid_changelog:4"},
    {"aggregate": "aggregate.after_flush:5"},
    {"aggregate": "aggregate.before_commit:6"},
    {"aggregate": "aggregate.mid_batch:3"},
    {"aggregate": "aggregate.on_assign:1"},
    {"enrich": "enrich.after_send:3", "aggregate": "aggregate.after_flush:8"},
    {"enrich": "enrich.before_commit:4"},
]


@pytest.mark.slow
@pytest.mark.parametrize("crashes", CRASH_POINTS, ids=lambda c: "+".join(c.values()))
async def test_kill_9_at_named_points_changes_nothing(pipeline_factory: Any, kit: Any, crashes: dict[str, str]) -> None:
    # Small batches: many cycles, so the N-th pass through a point comes while traffic still flows.
    pipeline, scenario = await kit.start(pipeline_factory, extra_env={"BUDGETFLOW_WORKER__MAX_BATCH_RECORDS": "200"})
    states = await _run_with_crashes(pipeline, scenario, crashes, kit)
    kit.check_counts(states, scenario)


@pytest.mark.slow
async def test_kill_9_at_random_moments_changes_nothing(pipeline_factory: Any, kit: Any) -> None:
    pipeline, scenario = await kit.start(pipeline_factory)
    rng = random.Random(2026)
    workers = {role: pipeline.start(role) for role in ("enrich", "aggregate")}
    producing = asyncio.create_task(pipeline.produce(scenario.records))
    kills = 0
    for _ in range(6):
        await asyncio.sleep(rng.uniform(1.0, 4.0))
        role = rng.choice(["enrich", "aggregate"])
        workers[role].kill()
        kills += 1
        workers[role] = pipeline.start(role)
    await producing
    states = await kit.settle(pipeline, scenario)
    kit.check_counts(states, scenario)
    assert kills == 6


@pytest.mark.slow
async def test_two_aggregates_one_killed_partitions_move(pipeline_factory: Any, kit: Any) -> None:
    pipeline, scenario = await kit.start(pipeline_factory)
    pipeline.start("enrich")
    first = pipeline.start("aggregate", data="agg-a")
    second = pipeline.start("aggregate", data="agg-b")
    half = len(scenario.records) // 2
    await pipeline.produce(scenario.records[:half])
    await asyncio.sleep(3)
    second.kill()  # its partitions move to the first within the session timeout
    await pipeline.produce(scenario.records[half:])
    states = await kit.settle(pipeline, scenario)
    kit.check_counts(states, scenario)
    assert first.alive


@pytest.mark.slow
async def test_kill_9_during_a_rebalance(pipeline_factory: Any, kit: Any) -> None:
    pipeline, scenario = await kit.start(pipeline_factory)
    pipeline.start("enrich")
    pipeline.start("aggregate", data="agg-a")
    await pipeline.produce(scenario.records[: len(scenario.records) // 3])
    await asyncio.sleep(2)
    # A second worker joins and is killed while its partitions are being handed over.
    joining = pipeline.start("aggregate", data="agg-b", crash_at="aggregate.on_assign:1")
    await pipeline.produce(scenario.records[len(scenario.records) // 3 :])
    deadline = time.monotonic() + 60
    while joining.alive and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert joining.proc.returncode == -9, joining.tail()
    states = await kit.settle(pipeline, scenario)
    kit.check_counts(states, scenario)
