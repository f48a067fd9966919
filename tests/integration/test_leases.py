"""Leases on the real pipeline: two routers at a block_all cap admit no more than the budget holds, together.

Each router admits cloud spend only against headroom the aggregate leased it (asked on the lease-asks topic,
granted on budget-leases), so the sum of what they admit never passes the limit, whatever their concurrency; and
both keep going until the budget is spent, so little is stranded.
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
COST = 10**9  # $0.001: 400 output tokens of test-small, and no input
EXACT = 500


async def test_two_routers_together_admit_what_a_block_all_budget_holds(pipeline_factory: Any, tmp_path: Path) -> None:
    from budgetflow.streams import BudgetPublisher, BudgetView, Candidate, Usage
    from budgetflow.streams.gateway.routing import Rejection
    from budgetflow.streams.ops.readback import read_period_states

    pipeline = pipeline_factory(clock_start=datetime.now(UTC).isoformat(), speed=1.0)
    assert pipeline.cli("topics", "create").returncode == 0
    (pipeline.root / "policies.yaml").write_text(POLICIES)
    assert pipeline.cli("policy", "apply", str(pipeline.root / "policies.yaml")).returncode == 0
    pipeline.start("enrich")
    pipeline.start("aggregate")
    cloud = Candidate("test-small", "cloud")
    base = pipeline.settings()
    routers = []
    for name in ("gw1", "gw2"):
        settings = base.model_copy(update={"view": base.view.model_copy(update={"router_id": name})})
        view = BudgetView(settings)
        publisher = BudgetPublisher(settings, spool_dir=tmp_path / f"spool-{name}")
        await view.start()
        await publisher.start()
        routers.append((view, publisher))
    try:
        for view, _ in routers:
            await view.ready(timeout_s=60)

        async def call(view: Any, publisher: Any, request_id: str) -> bool:
            decision = view.decide(request_id, ["cap:a"], [cloud])
            if decision.rejection is not None:
                return False
            lease = await view.lease(["cap:a"], COST)
            if isinstance(lease, Rejection):
                return False
            handle = await publisher.publish_request(
                request_id=request_id,
                model="test-small",
                provider="testco",
                backend="cloud",
                budgets=["cap:a"],
                input_bytes=0,
                max_tokens=400,
                lease=lease,
            )
            view.admit(["cap:a"], COST, request=handle)
            await publisher.publish_usage(handle, Usage(input_tokens=0, output_tokens=400))
            return True

        async def client(k: int) -> int:
            view, publisher = routers[k % 2]
            return sum([await call(view, publisher, f"l-{k}-{i}") for i in range(100)])

        admitted = sum(await asyncio.gather(*(client(k) for k in range(20))))  # 10 concurrent per router
        assert admitted <= EXACT, admitted  # never past the cap, whatever the concurrency
        assert admitted >= 0.98 * EXACT, admitted  # and little stranded
        deadline = time.monotonic() + 60
        state = None
        while time.monotonic() < deadline:
            states = await read_period_states(base, pipeline.topics.state.name)
            state = next((s for (b, _), s in states.items() if b == "cap:a"), None)
            if state is not None and (state.settles, state.reserved) == (admitted, 0):
                break
            await asyncio.sleep(0.5)
        assert state is not None
        assert state.settled == admitted * COST  # the ledger exact
    finally:
        for view, publisher in routers:
            await publisher.stop()
            await view.stop()


ROUTER = """
import asyncio
from budgetflow.schemas.settings import load_settings
from budgetflow.streams import BudgetView

async def main():
    async with BudgetView(load_settings()) as view:
        await view.ready(60)
        lease = await view.lease(["cap:b"], 10**9)
        print("leased" if lease is not None and hasattr(lease, "epochs") else f"not leased: {lease}", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_router_killed_holding_a_lease_holds_nothing_after_its_ttl(
    pipeline_factory: Any, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from budgetflow.streams import BudgetPublisher, BudgetView, Usage
    from budgetflow.streams.gateway.routing import Rejection
    from budgetflow.streams.ops.readback import read_period_states

    ttl = {"BUDGETFLOW_VIEW__LEASE_TTL_S": "5", "BUDGETFLOW_VIEW__LEASE_MARGIN_S": "1"}
    pipeline = pipeline_factory(
        clock_start=datetime.now(UTC).isoformat(),
        speed=1.0,
        extra_env={**ttl, "BUDGETFLOW_VIEW__LEASE_WAIT_MS": "300", "BUDGETFLOW_VIEW__LEASE_MIN_USD": "0.01"},
    )
    assert pipeline.cli("topics", "create").returncode == 0
    (pipeline.root / "policies.yaml").write_text(
        'budgets:\n  - {id: "cap:b", monthly_limit_usd: "0.02", hard_limit_action: block_all}\n'
    )
    assert pipeline.cli("policy", "apply", str(pipeline.root / "policies.yaml")).returncode == 0
    pipeline.start("enrich")
    pipeline.start("aggregate")
    # A router in a process of its own takes a lease ($0.01: what it asks at least), then dies by SIGKILL.
    env = {
        **pipeline.env_base,
        "BUDGETFLOW_VIEW__ROUTER_ID": "doomed",
        "BUDGETFLOW_VIEW__LEASE_WAIT_MS": "30000",  # the first grant, while the workers start
        "BUDGETFLOW_DATA_DIR": str(tmp_path / "doomed"),
    }
    doomed = subprocess.Popen([sys.executable, "-c", ROUTER], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert doomed.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(doomed.stdout.readline), 60)
        assert line.strip() == b"leased", line
    finally:
        doomed.kill()
        doomed.wait()

    settings = pipeline.settings()
    settings = settings.model_copy(update={"view": settings.view.model_copy(update={"router_id": "survivor"})})
    async with BudgetView(settings) as view, BudgetPublisher(settings, spool_dir=tmp_path / "spool") as publisher:
        await view.ready(timeout_s=60)

        async def admitted(prefix: str, n: int) -> int:
            count = 0
            for i in range(n):
                lease = await view.lease(["cap:b"], COST)
                if isinstance(lease, Rejection):
                    continue
                handle = await publisher.publish_request(
                    request_id=f"{prefix}-{i}",
                    model="test-small",
                    provider="testco",
                    backend="cloud",
                    budgets=["cap:b"],
                    input_bytes=0,
                    max_tokens=400,
                    lease=lease,
                )
                await publisher.publish_usage(handle, Usage(input_tokens=0, output_tokens=400))
                count += 1
            return count

        # The dead router's $0.01 is held: the survivor gets the other half of the budget, no more.
        first = await admitted("before", 20)
        assert first == 10, first
        # After the TTL its lease is released, and the survivor may spend the rest: the cap, exactly.
        deadline = time.monotonic() + 60
        second = 0
        while time.monotonic() < deadline and first + second < 20:
            second += await admitted(f"after-{second}", 20 - first - second)
            await asyncio.sleep(0.5)
        assert first + second == 20
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = await read_period_states(settings, pipeline.topics.state.name)
            state = next((s for (b, _), s in states.items() if b == "cap:b"), None)
            if state is not None and (state.settles, state.reserved) == (20, 0):
                break
            await asyncio.sleep(0.5)
        assert state is not None
        assert state.settled == 20 * COST  # the cap, exactly: never more
