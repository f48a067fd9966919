"""`budgetflow bench --quick --only cluster` starts a three-node cluster of its own (no session broker), kills the
status partition's leader once beside one window with no fault, and makes its table. Properties are checked,
never timings: one trial of each kind with positive figures, the ledger exact through the kill, every node and
worker stopped at the end."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(400)


def test_quick_cluster_bench_makes_its_table(tmp_path: Path, budgetflow_cli: Callable[..., list[str]]) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    proc = subprocess.run(
        budgetflow_cli("bench", "--quick", "--only", "cluster", "--out", str(out)),
        capture_output=True,
        text=True,
        env=env,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    section = json.loads(out.read_text())["sections"]["cluster"]
    assert (section["nodes"], section["replication_factor"], section["min_insync_replicas"]) == (3, 3, 2)
    assert section["kills"] == 1
    assert section["ledger_exact"], "every request counted once through the kill"
    assert section["requests"] > 0
    assert [t["kind"] for t in section["trials"]] == ["kill", "baseline"]
    kill, baseline = section["trials"]
    assert kill["window_s"] == baseline["window_s"] > 0, "the baseline's window is as long as the kill's"
    assert kill["node"] in (1, 2, 3)
    for trial in section["trials"]:
        assert trial["gap_s"] > 0, trial
        assert trial["max_age_s"] > 0, trial
    assert kill["new_leader_s"] > 0
    for kind in ("baseline", "kill"):
        assert section[kind]["trials"] == 1
        assert section[kind]["gap_s"]["p50"] == section[kind]["gap_s"]["max"]
    assert "| status partition's leader SIGKILLed | 1 |" in proc.stdout
    assert (
        "budgetflow-bench-cluster-"
        not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    ), "no node of the bench's cluster left running"
    print(proc.stdout)
