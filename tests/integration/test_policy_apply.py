"""`budgetflow policy apply` on a real broker: --dry-run prints what would change and writes nothing; a bad
file is refused before anything connects, so even with no broker it is one line, at once."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(180)

FIRST = """\
budgets:
  - id: "team:a"
    monthly_limit_usd: 20
    soft_limit_percent: 80
  - id: "team:b"
    monthly_limit_usd: "5.00"
  - id: "team:old"
    monthly_limit_usd: 1
"""

SECOND = """\
budgets:
  - id: "team:a"
    monthly_limit_usd: 25.5
    soft_limit_percent: 90.0
  - id: "team:b"
    monthly_limit_usd: 5.0
  - id: "team:new"
    monthly_limit_usd: 1e2
"""


async def test_dry_run_prints_the_changes_and_writes_nothing(pipeline_factory: Any) -> None:
    pipeline = pipeline_factory(clock_start="2026-11-01T00:00:00Z", speed=1.0)
    first, second = pipeline.root / "first.yaml", pipeline.root / "second.yaml"
    first.write_text(FIRST)
    second.write_text(SECOND)
    applied = pipeline.cli("policy", "apply", str(first))
    assert applied.returncode == 0, applied.stderr
    policies, audit = pipeline.topics.policies.name, pipeline.topics.audit.name
    # Sorted: a read of several partitions interleaves them in no fixed order.
    before = (sorted(await pipeline.records(policies)), sorted(await pipeline.records(audit)))
    assert len(before[0]) == 3

    proc = pipeline.cli("policy", "apply", str(second), "--dry-run", "--prune")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "+ team:new: monthly_limit_usd $100.00, soft_limit_percent 75, hard_limit_action warn",
        "~ team:a: monthly_limit_usd $20.00 -> $25.50, soft_limit_percent 80 -> 90",
        "- team:old",
    ]
    assert "dry run: 1 added, 1 changed, 1 removed, 1 unchanged; nothing was published" in proc.stderr
    # Without --prune, a dry run says which budgets stay although the file lacks them.
    kept = pipeline.cli("policy", "apply", str(second), "--dry-run")
    assert kept.stdout.splitlines()[-1] == "= team:old: on the topic, not in the file; kept (--prune deletes it)"
    # Nothing was written: neither policies nor audit records.
    assert (sorted(await pipeline.records(policies)), sorted(await pipeline.records(audit))) == before

    # The same file applied for real publishes exactly what the dry run said.
    proc = pipeline.cli("policy", "apply", str(second), "--prune")
    assert proc.returncode == 0, proc.stderr
    new = [r for r in await pipeline.records(policies) if r not in before[0]]
    assert sorted((k.decode(), v is None) for _, k, v, _ in new if k) == [
        ("team:a", False),
        ("team:new", False),
        ("team:old", True),
    ]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_bad_file_is_refused_at_once_with_no_broker(
    tmp_path: Path, dry_run: bool, budgetflow_cli: Callable[..., list[str]]
) -> None:
    bad = tmp_path / "policies.yaml"
    bad.write_text(FIRST.replace("monthly_limit_usd: 1\n", "monthly_limit_usd: 1.0000001\n"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env["BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS"] = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    proc = subprocess.run(
        budgetflow_cli("policy", "apply", str(bad), *(["--dry-run"] if dry_run else [])),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert time.monotonic() - started < 10
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"budgetflow: {bad}:8: budgets[2].monthly_limit_usd: amount has more than 6 decimals"
    ]
    assert proc.stdout == ""
