"""`budgetflow bench --quick` runs and writes its JSON (timings are reported, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def _answers() -> dict[str, dict[str, float]]:
    times = {"p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0, "max_ms": 4.0}
    return {"200": times, "429": times}


def test_every_row_of_the_opt_in_tables_has_its_headers_cells() -> None:
    """The opt-in tables (LiteLLM's, the example gateway's at a hard cap, the cluster's stale statuses) as rendered: a row with a cell more or less than
    its header is a table no reader can follow."""
    from budgetflow.streams.dev.bench_report import render

    cell = {"workers": 2, "gateways": 2, "concurrency": 10, "admitted": 500, "ratio": 1.0, "spend_usd": "0.500000"}
    cell |= {"admitted_before_first_refusal": 499, "admitted_before_first_429": None, "requests_per_s": 90.0}
    cell |= {"ledger_exact": True, "answer_ms": _answers()}
    shape = {"limit_usd": "0.50", "per_request_usd": "0.001000", "requests": 2000, "exact": 500}
    latency = {"p50_ms": 16.0, "p99_ms": 30.0}
    sections = {
        "litellm": {
            **shape,
            "litellm_version": "1.110.2",
            "overshoot": [{**cell, "system": system, "budget": "b"} for system in ("budgetflow", "LiteLLM")],
            "latency": {"requests": 500, "warm_up": 50, "with_callback": latency, "without_callback": latency}
            | {"added_p50_ms": 0.2, "added_p99_ms": 0.1},
        },
        "caps": {**shape, "hard_limit_action": "block_all", "cells": [{**cell, "leases": leases} for leases in (0, 1)]},
        "cluster": {"nodes": 3, "replication_factor": 3, "min_insync_replicas": 2, "requests_per_s": 25, "budgets": 8}
        | {"status_refresh_s": 0.1, "requests": 3635, "ledger_exact": True}
        | {
            "baseline": {"trials": 5, "gap_s": {"p50": 0.2, "max": 0.3}, "max_age_s": {"p50": 0.3, "max": 0.4}},
            "kill": {"trials": 5, "gap_s": {"p50": 7.3, "max": 8.3}, "max_age_s": {"p50": 7.3, "max": 8.3}}
            | {"new_leader_s": {"p50": 6.1, "max": 7.0}},
        },
    }
    text = render({"date": "2026-12-02", "quick": False, "sections": sections})
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    assert [len(table) for table in tables] == [4, 4, 4], text  # three tables: header, rule, two rows
    for table in tables:
        assert {row.count("|") for row in table} == {table[0].count("|")}, "\n".join(table)


def test_the_cluster_bench_gap_is_the_longest_time_without_a_status() -> None:
    """From the last status before the window (the router's news then) to the next, and on to the window's end."""
    from budgetflow.schemas.settings import Settings
    from budgetflow.streams.dev.bench_cluster import _TimedView

    view = _TimedView(Settings())
    view.arrivals = [1.0, 1.2, 5.0, 5.1]
    assert view.window(1.3, 6.0) == {"gap_s": pytest.approx(3.8)}  # 1.2 -> 5.0
    assert view.window(5.05, 9.0) == {"gap_s": pytest.approx(3.9)}  # 5.1 -> the end, nothing since
    assert view.window(0.5, 1.1) == {"gap_s": pytest.approx(0.5)}  # no status before: from the window's start
