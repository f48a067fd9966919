"""`budgetflow bench --quick --only litellm` runs against the session broker and makes its table: 60 requests on a
$0.030 budget, concurrency 1 and 10, one proxy worker. Properties are checked, never timings: budgetflow's ledger
settles exactly the admitted requests at $0.001 each, one router at concurrency 1 never passes the cap, and every
count is one of the requests sent."""

from __future__ import annotations

import json
import os
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from litellm_proxy import HAVE_LITELLM, SKIP_REASON

pytestmark = [pytest.mark.timeout(400), pytest.mark.skipif(not HAVE_LITELLM, reason=SKIP_REASON)]

SYSTEMS = {
    ("budgetflow", "block_all policy on a budget of the key"),
    ("LiteLLM", "key max_budget (custom auth, spend in memory)"),
    ("LiteLLM", "deployment max_budget (router, spend in memory)"),
}


def test_quick_litellm_bench_makes_its_table(kafka_bootstrap: str, tmp_path: Path, budgetflow_cli) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env["BUDGETFLOW_BENCH_BOOTSTRAP"] = kafka_bootstrap
    proc = subprocess.run(
        budgetflow_cli("bench", "--quick", "--only", "litellm", "--out", str(out)),
        capture_output=True,
        text=True,
        env=env,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    section = json.loads(out.read_text())["sections"]["litellm"]
    n, exact = section["requests"], section["exact"]
    assert (n, exact, section["budgetflow_cost_usd"]) == (60, 30, "0.001000000000")
    assert Decimal(section["litellm_reported_cost_usd"]) == Decimal("0.001")

    rows = section["overshoot"]
    cells = [(r["system"], r["budget"], r["workers"], r["concurrency"]) for r in rows]
    assert sorted(cells) == sorted((s, b, 1, c) for s, b in SYSTEMS for c in (1, 10)), "one row per cell"
    for r in rows:
        assert sum(r["statuses"].values()) == n, r
        assert 0 <= r["admitted"] == r["statuses"].get("200", 0) <= n, r
        assert r["ratio"] == r["admitted"] / exact
        assert Decimal(r["spend_usd"]) == r["admitted"] * Decimal("0.001"), r  # at $0.001 each, exactly
        before = r["admitted_before_first_refusal"]
        assert before is None or 0 <= before <= r["admitted"], r
        if r["system"] == "budgetflow":
            assert r["settles"] == r["admitted"], r  # the spend above is the ledger's: one settle per admission
            assert r["ledger_exact"], r
            assert r["reserved_usd"] == "0.000000"
            assert set(r["statuses"]) <= {"200", "429"}, r  # refused by the budget, nothing else
            assert r["admitted"] > 0
        else:
            assert r["odd_answers"] == 0, r  # every answer LiteLLM priced at $0.001
    one_by_one = next(r for r in rows if r["system"] == "budgetflow" and r["concurrency"] == 1)
    assert one_by_one["admitted"] <= exact, "one router, one request at a time: each admission counted before the next"
    assert one_by_one["statuses"]["429"] == n - one_by_one["admitted"]

    latency = section["latency"]
    assert latency["requests"] == 20
    for side in ("with_callback", "without_callback"):
        assert latency[side]["p99_ms"] >= latency[side]["p50_ms"] > 0
    assert latency["added_p50_ms"] == latency["with_callback"]["p50_ms"] - latency["without_callback"]["p50_ms"]
    assert "| system | budget | proxy workers | concurrency | admitted | admitted / exact | spend |" in proc.stdout
    print(proc.stdout)
