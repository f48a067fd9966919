"""`budgetflow bench --quick --only caps` runs against the session broker and makes its table: 60 requests on a
$0.030 block_all budget through the example gateway, one gateway at concurrency 1 and two at concurrency 10.
Properties are checked, never timings: the ledger settles exactly the admitted requests at $0.001 each in every
cell, one gateway never admits past the cap, and every count is one of the requests sent."""

from __future__ import annotations

import json
import os
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(400)


def test_quick_caps_bench_makes_its_table(kafka_bootstrap: str, tmp_path: Path, budgetflow_cli) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env["BUDGETFLOW_BENCH_BOOTSTRAP"] = kafka_bootstrap
    proc = subprocess.run(
        budgetflow_cli("bench", "--quick", "--only", "caps", "--out", str(out)),
        capture_output=True,
        text=True,
        env=env,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    section = json.loads(out.read_text())["sections"]["caps"]
    n, exact = section["requests"], section["exact"]
    assert (n, exact, section["limit_usd"], section["hard_limit_action"]) == (60, 30, "0.030", "block_all")
    # What a request costs and what enrich reserves for it, as checked before the cells ran.
    assert (section["budgetflow_cost_usd"], section["reservation_usd"]) == ("0.001000000000", "0.001000000000")
    assert section["fake_usage"]["completion_tokens"] == 20

    rows = section["cells"]
    cells = [(r["gateways"], r["concurrency"], r["leases"]) for r in rows]
    assert cells == [(1, 1, False), (2, 10, False), (2, 10, True)], "one row per cell, in order"
    assert len({r["budget_id"] for r in rows}) == len(rows), "a budget per cell"
    for r in rows:
        assert sum(r["statuses"].values()) == n, r
        assert set(r["statuses"]) <= {"200", "429"}, r  # refused by the budget, nothing else
        assert 0 < r["admitted"] == r["statuses"].get("200", 0) <= n, r
        assert r["exact"] == exact
        assert r["ratio"] == r["admitted"] / exact
        assert r["odd_answers"] == 0, r  # every answer was 20 completion tokens estimated at $0.001
        before = r["admitted_before_first_429"]
        assert before is None or 0 <= before <= r["admitted"], r
        # The ledger holds exactly what was admitted: one settle per admission at $0.001, nothing reserved.
        assert r["ledger_exact"], r
        assert r["settles"] == r["admitted"], r
        assert Decimal(r["spend_usd"]) == r["admitted"] * Decimal("0.001"), r
        assert r["reserved_usd"] == "0.000000", r
    for r in rows:
        if r["gateways"] == 1 or r["leases"]:
            # One gateway counts each admission until a status covers it; with leases, any number of them admit
            # only against headroom leased to each: never past the cap.
            assert r["admitted"] <= exact, r
            assert r["statuses"].get("429", 0) == n - r["admitted"], r
    assert "| leases | gateways | concurrency | admitted | admitted / exact | settled (ledger) |" in proc.stdout
    print(proc.stdout)
