"""One router's admissions against the real pipeline: counted until a status covers them, never twice.

A router counts the cloud spend it let through until a status of the budget says it counts that request event
(``covers``). So one router at the cap of a ``block_all`` budget admits exactly what the budget holds, and once
traffic stops its view of the budget is the ledger's, without waiting ``VIEW__ADMIT_MAX_AGE_S``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(300)

POLICIES = """
budgets:
  - {id: "cap:a", monthly_limit_usd: "0.50", hard_limit_action: block_all}
"""
COST = 10**9  # $0.001: 400 output tokens of test-small ($2.50 per million), and no input
EXACT = 500  # requests the budget holds


async def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_one_router_admits_what_the_budget_holds_and_counts_nothing_twice(
    pipeline_factory: Any, tmp_path: Path
) -> None:
    from budgetflow.streams import BudgetPublisher, BudgetView, Candidate, Usage

    pipeline = pipeline_factory(
        clock_start=datetime.now(UTC).isoformat(),
        speed=1.0,
        # Admissions are never forgotten by age here: only a status that covers them ends their count.
        extra_env={"BUDGETFLOW_VIEW__ADMIT_MAX_AGE_S": "3600", "BUDGETFLOW_VIEW__STALE_AFTER_S": "30"},
    )
    assert pipeline.cli("topics", "create").returncode == 0
    (pipeline.root / "policies.yaml").write_text(POLICIES)
    assert pipeline.cli("policy", "apply", str(pipeline.root / "policies.yaml")).returncode == 0
    pipeline.start("enrich")
    pipeline.start("aggregate")
    cloud = Candidate("test-small", "cloud")
    async with (
        BudgetView(pipeline.settings()) as view,
        BudgetPublisher(pipeline.settings(), spool_dir=tmp_path / "spool") as publisher,
    ):
        await view.ready(timeout_s=60)
        admitted = 0

        async def call(i: int) -> bool:
            decision = view.decide(f"c-{i}", ["cap:a"], [cloud])
            if decision.rejection is not None:
                return False
            handle = await publisher.publish_request(
                request_id=f"c-{i}",
                model="test-small",
                provider="testco",
                backend="cloud",
                budgets=["cap:a"],
                input_bytes=0,
                max_tokens=400,
            )
            view.admit(["cap:a"], COST, request=handle)
            await publisher.publish_usage(handle, Usage(input_tokens=0, output_tokens=400))
            return True

        # Half the budget, then traffic stops: once a status counts all of it, the router's view is the ledger's.
        for i in range(EXACT // 2):
            admitted += await call(i)
        assert admitted == EXACT // 2
        half = EXACT // 2 * COST
        await wait_for(lambda: view.last_status("cap:a").spend_pico == half, 60, "a status that counts the first half")
        await wait_for(lambda: view.status("cap:a").spend_pico == half, 10, "the router to stop counting them")

        # Then on to the cap, paced so that statuses arrive between admissions.
        i = EXACT // 2
        while await call(i):
            admitted += 1
            i += 1
            await asyncio.sleep(0.005)
        # Exactly what the budget holds; a double count would have refused some of it.
        assert admitted == EXACT, admitted
        full = EXACT * COST
        await wait_for(lambda: view.last_status("cap:a").spend_pico == full, 60, "a status at the cap")
        assert view.status("cap:a").spend_pico == full
        assert view.decide("after", ["cap:a"], [cloud]).rejection is not None
