"""`budgetflow bench --quick --only faust` runs against the session broker and makes its tables: 4,000 ledger
entries read by a raw consumer, the aggregate and the Faust app in turn, then each system's worker SIGKILLed twice
during 2,000 entries. Properties are checked, never timings: the aggregate's sums are exact to the pico-dollar with
and without the kills; the Faust app's are reported, whatever they are (an exact Faust run is a result too).

Faust runs in a venv of its own (`make faust-venv`, made by `make setup`): without one the test is skipped."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from budgetflow.streams.dev.faust_worker import FAUST_REQUIREMENT, faust_python

try:
    PYTHON: Path | None = faust_python(create=False)
    SKIP_REASON = ""
except RuntimeError as exc:
    PYTHON, SKIP_REASON = None, f"no venv with {FAUST_REQUIREMENT} ({exc}); make faust-venv"

pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(PYTHON is None, reason=SKIP_REASON)]

KILL_KEYS = {"exact", "budgets", "wrong_budgets", "settles_lost", "settles_doubled", "settled_error_pico"}
KILL_KEYS |= {"reserved_left_pico", "killed_at_committed", "committed_at_end", "stalls", "elapsed_s"}


def test_quick_faust_bench_makes_its_tables(kafka_bootstrap: str, tmp_path: Path, budgetflow_cli) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env |= {"BUDGETFLOW_BENCH_BOOTSTRAP": kafka_bootstrap, "BUDGETFLOW_BENCH_FAUST_PYTHON": str(PYTHON)}
    proc = subprocess.run(
        budgetflow_cli("bench", "--quick", "--only", "faust", "--out", str(out)),
        capture_output=True,
        text=True,
        env=env,
        timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    section = json.loads(out.read_text())["sections"]["faust"]
    assert section["faust"] == FAUST_REQUIREMENT

    t = section["throughput"]
    assert (t["entries"], t["budgets"]) == (4_000, 1_000)
    assert t["raw_consumer_per_s"] > 0
    ours = t["aggregate"]
    assert ours["ratio"] == ours["per_s"] / t["raw_consumer_per_s"]
    assert ours["exact"] is True, "the aggregate's sums of 4,000 entries, no kill"
    assert t["faust_take"]["take"] == 2_000
    for faust in (t["faust"], t["faust_take"]):
        assert isinstance(faust["exact"], bool)
        if faust["per_s"] is None:  # a Faust that crashes or stalls is reported, not raised
            assert faust["failed"]
            assert faust["ratio"] is None
        else:
            assert faust["ratio"] == faust["per_s"] / t["raw_consumer_per_s"]

    kills = section["kill9"]
    assert (kills["entries"], kills["budgets"]) == (2_000, 100)
    for system in ("budgetflow", "faust"):
        row = kills[system]
        assert set(row) == KILL_KEYS | ({"settles_lost_for_good"} if system == "faust" else set()), row
        assert len(row["killed_at_committed"]) == 2, row
        assert 0 <= row["wrong_budgets"] <= 100
        assert row["exact"] == (row["wrong_budgets"] == 0)
    assert 0 <= kills["faust"]["settles_lost_for_good"] <= kills["faust"]["settles_lost"]
    ours = kills["budgetflow"]
    assert ours["stalls"] == [], ours
    assert ours["committed_at_end"][0] >= ours["committed_at_end"][1] >= 2_000, "every entry (and tick) committed"
    assert (ours["exact"], ours["settles_lost"], ours["settles_doubled"]) == (True, 0, 0), ours
    assert (ours["settled_error_pico"], ours["reserved_left_pico"]) == (0, 0), ours

    assert "| reader | entries/s | ratio to the raw consumer | final sums exact |" in proc.stdout
    assert "| system | exact | wrong budgets | settles lost |" in proc.stdout
    print(proc.stdout)
