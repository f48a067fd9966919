"""The demo runs end to end (short form) and its books are exact."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(400)


def test_short_demo(kafka_bootstrap: str, tmp_path: Path, budgetflow_cli) -> None:
    summary_file = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env.update(
        {
            "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            "BUDGETFLOW_DATA_DIR": str(tmp_path / "data"),
            "COLUMNS": "140",
        }
    )
    proc = subprocess.run(
        budgetflow_cli("demo", "--duration", "15", "--requests", "600", "--summary-json", str(summary_file)),
        capture_output=True,
        text=True,
        env=env,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert summary["exact"], "the pipeline's totals differ from the demo's own count"
    assert summary["rolled_over"]
    assert {"soft_limit", "hard_limit", "normal"} <= set(summary["transitions"])
    assert summary["dead_letters"] >= summary["malformed_events"] > 0
    month = summary["period"]
    for budget, row in summary["budgets"].items():
        assert row["pipeline_settled_usd"][month] == row["demo_counted_usd"][month], budget
    assert float(summary["budgets"]["global"]["saved_by_shift_usd"]) > 0
    assert sum(row["rejected"] for row in summary["budgets"].values()) > 0
    # Days 25 to 28 the local model is down: shifted requests fell back to cloud, and the books are still exact.
    assert summary["budgets"]["global"]["fallbacks"] > 0
    assert "fell back to cloud" in proc.stdout
    assert "exact to the pico-dollar" in proc.stdout
