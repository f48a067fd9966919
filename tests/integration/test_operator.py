"""Operator tools against the real pipeline: the audit trail of policy changes, ledger adjustments that count
exactly once and move the status, and a report replayed from the ledger that equals the tables exactly."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from datetime import datetime
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.timeout(400)


def pico(usd: str) -> int:
    from budgetflow.schemas.money import parse_usd

    return parse_usd(usd)


async def test_audit_adjust_and_report(pipeline_factory: Any, kit: Any) -> None:
    pipeline, scenario = await kit.start(pipeline_factory, n=400)
    pipeline.start("enrich")
    pipeline.start("aggregate")
    await pipeline.produce(scenario.records)
    await kit.settle(pipeline, scenario)

    # A policy change by a named actor joins the trail after the initial apply.
    lowered = pipeline.root / "lowered.yaml"
    lowered.write_text(kit.POLICIES.replace('monthly_limit_usd: "2.00"', 'monthly_limit_usd: "1.50"'))
    proc = pipeline.cli("policy", "apply", str(lowered), "--actor", "alice@finops")
    assert proc.returncode == 0, proc.stderr
    proc = pipeline.cli("audit", "team:b", "--json")
    assert proc.returncode == 0, proc.stderr
    trail = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert [r["kind"] for r in trail] == ["policy", "policy"]
    assert trail[0]["old"] is None
    assert trail[0]["new"]["monthly_limit_usd"] == "2.000000000000"
    assert trail[1]["actor"] == "alice@finops"
    assert trail[1]["old"]["monthly_limit_usd"] == "2.000000000000"
    assert trail[1]["new"]["monthly_limit_usd"] == "1.500000000000"
    assert trail[1]["revision"] > trail[0]["revision"]
    proc = pipeline.cli("audit")
    assert {line.split("\t")[1] for line in proc.stdout.splitlines()} == set(kit.LIMITS)

    # Adjustments: a debit that pushes team:a over its limit this month, run twice with one id (counted once),
    # and a credit to team:b in the closed-but-in-grace November.
    for _ in range(2):
        proc = pipeline.cli(
            "ledger",
            "adjust",
            "team:a",
            "1.00",
            "--period",
            "2026-12",
            "--reason",
            "late invoice",
            "--id",
            "inv-17",
            "--actor",
            "bob@finops",
        )
        assert proc.returncode == 0, proc.stderr
    proc = pipeline.cli("ledger", "adjust", "team:b", "-0.05", "--period", "2026-11", "--reason", "refund")
    assert proc.returncode == 0, proc.stderr
    bad = pipeline.cli("ledger", "adjust", "team:b", "0.05", "--period", "2026-10", "--reason", "too late")
    assert bad.returncode != 0
    assert "closed" in bad.stderr
    expected = dict(scenario.settled)
    expected[("team:a", "2026-12")] = expected.get(("team:a", "2026-12"), 0) + pico("1.00")
    expected[("team:b", "2026-11")] -= pico("0.05")
    deadline = time.monotonic() + 60
    states: dict[Any, Any] = {}
    while time.monotonic() < deadline:
        states = await pipeline.period_states()
        if {k: s.settled for k, s in states.items()} == expected:
            break
        await asyncio.sleep(1)
    assert {k: s.settled for k, s in states.items()} == expected, pipeline.logs()
    # The status follows: team:a's limit is $0.50.
    deadline = time.monotonic() + 30
    latest: dict[str, Any] = {}
    while time.monotonic() < deadline:
        records = await pipeline.records(pipeline.topics.status.name)
        latest = {k.decode(): orjson.loads(v) for _, k, v, _ in records if v is not None}
        if latest.get("team:a", {}).get("settled_usd") == _usd(expected[("team:a", "2026-12")]):
            break
        await asyncio.sleep(0.5)
    assert latest["team:a"]["status"] == "hard_limit"
    adjusts = [orjson.loads(line) for line in pipeline.cli("audit", "--json").stdout.splitlines()]
    adjusts = [r for r in adjusts if r["kind"] == "adjust"]
    assert {(r["budget_id"], r["period"], r["amount_usd"], r["entry_id"]) for r in adjusts} == {
        ("team:a", "2026-12", "1.000000000000", "adjust:inv-17:0:adjust:team:a"),
        ("team:b", "2026-11", "-0.050000000000", adjusts[-1]["entry_id"]),
    }

    # The report, replayed from the ledger, equals the tables to the pico-dollar, per budget and period.
    for period in ("2026-11", "2026-12"):
        proc = pipeline.cli("report", "--period", period, "--format", "json")
        assert proc.returncode == 0, proc.stderr
        rows = orjson.loads(proc.stdout)
        totals: dict[str, int] = {}
        for row in rows:
            assert row["period"] == period
            totals[row["budget"]] = totals.get(row["budget"], 0) + pico(row["settled_usd"])
        assert totals == {b: s.settled for (b, p), s in states.items() if p == period}
        requests: dict[str, int] = {}
        for row in rows:
            if row["model"] != "(adjustment)":
                requests[row["budget"]] = requests.get(row["budget"], 0) + row["requests"]
        assert requests == {b: n for (b, p), n in scenario.requests.items() if p == period}
    proc = pipeline.cli("report", "--period", "2026-12")
    table = list(csv.DictReader(io.StringIO(proc.stdout)))
    adjustment = [r for r in table if r["budget"] == "team:a" and r["model"] == "(adjustment)"]
    assert [r["settled_usd"] for r in adjustment] == ["1.000000000000"]
    assert {r["model"] for r in table} >= {"test-small", "test-large", "test-local"}

    # The ledger keeps 400 days by record timestamp, and the timestamps are when entries were produced, not
    # their event time: the simulated month here lies ahead of the wall clock, and a back-dated entry would
    # otherwise be deleted early.
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from budgetflow.streams.kafka.clients import client_options

    settings = pipeline.settings()
    consumer = AIOKafkaConsumer(**client_options(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(pipeline.topics.ledger.name, p) for p in range(pipeline.topics.ledger.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        batch = await consumer.getmany(*tps, timeout_ms=5000, max_records=500)
    finally:
        await consumer.stop()
    records = [r for rs in batch.values() for r in rs if b'"kind":"tick"' not in r.value]
    assert records
    wall = time.time() * 1000
    away = 0
    for record in records:
        assert wall - 600_000 < record.timestamp <= wall + 1000, "produce time"
        event_ms = datetime.fromisoformat(orjson.loads(record.value)["occurred_at"]).timestamp() * 1000
        away += not wall - 600_000 < event_ms <= wall + 1000
    assert away, "some entries' event time lies outside the produce window, so the check above means something"
    assert pipeline.topics.ledger.config["retention.ms"] == str(400 * 86_400_000)


def _usd(value: int) -> str:
    from budgetflow.schemas.money import usd_string

    return usd_string(value)
