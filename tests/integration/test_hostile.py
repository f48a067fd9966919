"""Hostile input and careless operations on a real broker: nothing stops a worker, nothing loses a cent.

A month of good traffic is interleaved with every kind of bad record the hardening issue reproduced (a record
of about a megabyte, records that are not JSON or have the wrong types, money and sizes past their bounds, a
tick from a clock forty days ahead, a credit larger than the month's spend, bad policy records), while
``budgetflow worker --role all`` is SIGKILLed, now by process group, now its supervisor alone. At the end every
worker runs, every good record is counted to the pico-dollar, and every bad one is in the DLQ with its reason.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.timeout(900)

SPEED = 600.0  # ten simulated minutes per second: the scenario's eight hours (and its TTLs) pass in a minute
SKEW_S = "36000"  # the scenario is published up to 8 simulated hours ahead of the clock
HORIZON_S = "604800"  # a week: the kills' minutes must not age the entries past the dedupe horizon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


class Supervised:
    """``budgetflow worker --role all`` in a process group of its own."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.env = {**pipeline.env_base, "BUDGETFLOW_DATA_DIR": str(pipeline.root / "data")}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.pipeline.root / f"all-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "budgetflow.streams", "worker", "--role", "all"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def children(self) -> list[int]:
        assert self.proc is not None
        return children_of(self.proc.pid)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and len([c for c in self.children if alive(c)]) == 2

    async def kill_group(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    async def kill_parent(self) -> None:
        """SIGKILL the supervisor alone: its children must not live on as orphans holding the ports."""
        assert self.proc is not None
        await wait_for(lambda: len(self.children) == 2, 60, "the supervisor's two children")
        children = self.children
        self.proc.kill()
        self.proc.wait(timeout=30)
        await wait_for(lambda: not any(alive(c) for c in children), 60, "the orphaned children to exit")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.pipeline.root.glob("all-*.log")))


def ledger_entry(**fields: Any) -> bytes:
    return orjson.dumps({"v": 1, "attempt": 0, "priced": True, "tier": "exact", **fields})


def bad_records(topics: Any, now: datetime) -> list[tuple[str, bytes | None, bytes | None, str | None]]:
    """(topic, key, value, expected DLQ reason or None for records that must change nothing and go nowhere)."""
    req = {
        "v": 1,
        "request_id": "hostile",
        "occurred_at": now.isoformat(),
        "budgets": ["team:a"],
        "model": "test-small",
        "provider": "testco",
        "backend": "cloud",
        "prompt": "hi",
    }
    use = {
        "v": 1,
        "request_id": "hostile",
        "request_occurred_at": now.isoformat(),
        "occurred_at": now.isoformat(),
        "model": "test-small",
        "provider": "testco",
        "backend": "cloud",
        "outcome": "completed",
        "input_tokens": 1,
        "output_tokens": 1,
    }
    future = now + timedelta(days=40)
    return [
        # About a megabyte of invalid usage: its dead letter must still fit (it is cut to a digest).
        # (A list of numbers in a known-safe field: redaction keeps it, so only the size rule can cut it.)
        (topics.usage.name, b"big", b'{"v":1,"input_tokens":[' + b"1," * 520_000 + b"1]}", "invalid"),
        (topics.requests.name, b"nj", b"\x00\xff this is not JSON", "json"),
        (topics.usage.name, b"nj", b"{", "json"),
        (topics.requests.name, b"wt", orjson.dumps({**req, "max_tokens": "lots"}), "invalid"),
        (topics.usage.name, b"wt", orjson.dumps({**use, "input_tokens": "ten"}), "invalid"),
        (
            topics.requests.name,
            b"ib",
            orjson.dumps({**{k: v for k, v in req.items() if k != "prompt"}, "input_bytes": 1 << 40}),
            "out_of_range",
        ),
        (topics.usage.name, b"ot", orjson.dumps({**use, "output_tokens": 10**12}), "out_of_range"),
        (
            topics.requests.name,
            b"in",
            orjson.dumps({**req, "input": "a Responses-API prompt", "prompt": None, "v": 7}),
            "version",
        ),
        # Straight onto the ledger: money past the bound of one entry, and garbage.
        (
            topics.ledger.name,
            b"team:a",
            ledger_entry(
                entry_id="x:0:settle:team:a",
                budget_id="team:a",
                request_id="x",
                kind="settle",
                period="2026-11",
                amount_pico_usd=10**19,
                occurred_at=now.isoformat(),
            ),
            "out_of_range",
        ),
        (topics.ledger.name, b"team:a", b"not json", "json"),
        # A tick from a clock forty days ahead: bounded by its broker time, it makes nothing late.
        (
            topics.ledger.name,
            b"tick",
            ledger_entry(
                entry_id="tick:evil",
                kind="tick",
                request_id="tick",
                period=f"{future.year:04d}-{future.month:02d}",
                amount_pico_usd=0,
                occurred_at=future.isoformat(),
                expire=True,
            ),
            None,
        ),
        # Bad policy records: skipped, counted, everything still starts.
        (topics.policies.name, b"team:a", b"{ not a policy", None),
        (topics.policies.name, b"team:b", orjson.dumps({"id": "team:b", "monthly_limit_usd": 12}), None),
    ]


async def test_hostile_records_and_kills_stop_nothing_and_lose_nothing(pipeline_factory: Any, kit: Any) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    start = start.replace(year=2026, month=11, day=30, hour=20, minute=0, second=0)
    web, metrics = free_port(), free_port()  # fixed ports: an orphan from a killed supervisor would hold them
    pipeline, scenario = await kit.start(
        pipeline_factory,
        start=start,
        n=800,
        speed=SPEED,
        extra_env={
            "BUDGETFLOW_MAX_CLOCK_SKEW_S": SKEW_S,
            "BUDGETFLOW_WEB__PORT": str(web),
            "BUDGETFLOW_METRICS__PORT": str(metrics),
            "BUDGETFLOW_WORKER__SHUTDOWN_TIMEOUT_S": "10",
            "BUDGETFLOW_DEDUPE_HORIZON_S": HORIZON_S,
        },
    )
    topics = pipeline.topics
    now = start + timedelta(minutes=1)
    bad = bad_records(topics, now)
    # A credit larger than team:b's November spend: the month goes negative, its status still builds.
    credit = -120 * 10**12
    bad.append(
        (
            topics.ledger.name,
            b"team:b",
            ledger_entry(
                entry_id="adjust:big:0:adjust:team:b",
                budget_id="team:b",
                request_id="adjust:big",
                kind="adjust",
                period="2026-11",
                amount_pico_usd=credit,
                occurred_at=now.isoformat(),
            ),
            None,
        )
    )
    scenario.settled[("team:b", "2026-11")] += credit
    scenario.requests[("team:b", "2026-11")] += 1
    scenario.settles[("team:b", "2026-11")] = scenario.settles.get(("team:b", "2026-11"), 0) + 1

    await pipeline.produce([(t, k, v) for t, k, v, _ in bad if t == topics.policies.name])
    workers = Supervised(pipeline)
    workers.start()
    rng = random.Random(15)
    good = scenario.records
    mixed: list[tuple[str, bytes | None, bytes | None]] = list(good)
    for t, k, v, _ in bad:
        if t != topics.policies.name:
            mixed.insert(rng.randrange(len(mixed) + 1), (t, k, v))
    try:
        chunks = [mixed[i : i + len(mixed) // 6 + 1] for i in range(0, len(mixed), len(mixed) // 6 + 1)]
        for index, chunk in enumerate(chunks):
            await pipeline.produce(chunk)
            await asyncio.sleep(rng.uniform(0.5, 3.0))  # a random moment to kill at, not a wait for a condition
            if index % 2 == 0:
                await workers.kill_group()
            else:
                await workers.kill_parent()
            workers.start()
        await pipeline.produce([(t, k, v) for t, k, v, _ in bad if t == topics.policies.name])
        states = await kit.settle(pipeline, scenario, timeout_s=300)
        kit.check_counts(states, scenario)
        await wait_for(workers.running, 60, "the supervisor and both workers running")
        assert states[("team:b", "2026-11")].spend < 0

        letters = await pipeline.dead_letters()
        seen: dict[tuple[str, int], str] = {}
        for headers, _, value in letters:
            source = (headers["budgetflow.source.topic"].decode(), int(headers["budgetflow.source.offset"]))
            seen[source] = headers["budgetflow.reason"].decode()
            assert value is not None
            assert len(value) <= 64 * 1024
            assert b"Responses-API" not in value
        want = sorted(reason for t, _, _, reason in bad if reason is not None)
        got = sorted(seen.values())
        assert got == want, (got, want)
        assert workers.running(), workers.logs()
        assert "Traceback" not in workers.logs()
    finally:
        workers.stop()
