"""`budgetflow bench --quick` runs and writes its JSON (timings are reported, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = str(Path(sys.executable).with_name("budgetflow"))


def test_quick_bench_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            SCRIPT,
            "bench",
            "--quick",
            "--only",
            "tokenizers",
            "--only",
            "heuristic_error",
            "--only",
            "routing",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    tokenizers = results["sections"]["tokenizers"]
    assert set(tokenizers) >= {"200B", "2000B", "20000B"}
    for row in (tokenizers[k] for k in ("200B", "2000B", "20000B")):
        assert row["budgetflow"]["tokens_per_s"] > 0
        assert row["tiktoken"]["p99_us"] >= row["tiktoken"]["p50_us"]
    assert "code/o200k_base" in results["sections"]["heuristic_error"]
    routing = results["sections"]["routing"]
    assert routing["budgets"] == 2_000
    assert routing["view_traced_bytes"] > 0
    assert routing["decide"]["p99_us"] >= routing["decide"]["p50_us"] > 0
    assert "overhead" in proc.stdout


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [SCRIPT, "bench", "--only", "nope", "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown bench section" in proc.stderr
