"""The broker benchmarks run (quick sizes) so they cannot rot; their timings are printed, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(500)


def test_quick_pipeline_bench_writes_results(kafka_bootstrap: str, tmp_path: Path, budgetflow_cli) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env["BUDGETFLOW_BENCH_BOOTSTRAP"] = kafka_bootstrap
    proc = subprocess.run(
        budgetflow_cli(
            "bench",
            "--quick",
            "--only",
            "enrich",
            "--only",
            "aggregate",
            "--only",
            "latency",
            "--only",
            "load",
            "--only",
            "recovery",
            "--only",
            "publisher",
            "--only",
            "shards",
            "--out",
            str(out),
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stderr
    sections = json.loads(out.read_text())["sections"]
    for label in ("1000_budgets", "one_budget"):
        assert sections["aggregate"][label]["aggregate_per_s"] > 0
        assert sections["aggregate"][label]["raw_consumer_per_s"] > 0
    assert sections["latency"]["trials"] == 5
    assert sections["latency"]["p99_ms"] >= sections["latency"]["p50_ms"] > 0
    assert sections["publisher"]["publish_request"]["p99_us"] > 0
    assert sections["enrich"]["enrich_per_s"] > 0
    assert sections["load"]["latency"]["p99_ms"] > 0
    assert set(sections["load"]["overshoot"]) >= {"bounded", "admitted"}
    assert sections["recovery"]["ready_rocksdb_s"] > 0
    shards = sections["shards"]
    for cell in ("unsharded_1_worker", "sharded_1_worker", "sharded_2_workers"):
        assert shards[cell]["entries_per_s"] > 0
        assert shards[cell]["status_latency_ms"]["p99_ms"] > 0
    assert len(shards["sharded_2_workers"]["worker_cpu_percent"]) == 2
    assert len(shards["sharded_1_worker"]["partitions"]) > 1  # the shards are spread over the ledger
    print(proc.stdout)
