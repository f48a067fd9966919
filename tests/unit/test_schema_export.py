"""`budgetflow schema export` writes JSON Schemas that accept good events and refuse bad ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema

SCRIPT = str(Path(sys.executable).with_name("budgetflow"))


def test_exported_schemas_validate_events(tmp_path: Path) -> None:
    proc = subprocess.run([SCRIPT, "schema", "export", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"{n}.schema.json"
        for n in ("RequestEvent", "UsageEvent", "LedgerEntry", "BudgetStatus", "Heartbeat", "PolicyFile", "AuditRecord")
    )
    usage = json.loads((tmp_path / "UsageEvent.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(usage)
    good = {
        "v": 1,
        "request_id": "r",
        "request_occurred_at": "2026-11-01T00:00:00Z",
        "occurred_at": "2026-11-01T00:00:01Z",
        "model": "gpt-4o",
        "provider": "openai",
        "backend": "cloud",
        "outcome": "completed",
        "input_tokens": 10,
        "output_tokens": 5,
    }
    jsonschema.validate(good, usage)
    for bad in (
        {**good, "input_tokens": -1},
        {**good, "backend": "edge"},
        {k: v for k, v in good.items() if k != "model"},
    ):
        assert not jsonschema.Draft202012Validator(usage).is_valid(bad)
    status = json.loads((tmp_path / "BudgetStatus.schema.json").read_text())
    assert status["properties"]["spend_usd"]["type"] == "string"
