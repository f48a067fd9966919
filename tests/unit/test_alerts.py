"""The alert rules are valid and each alert is unit-tested with synthetic series, by Prometheus's own promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "budgetflow" / "files" / "prometheus-rules.yaml"
PROMTOOL = shutil.which("promtool")


@pytest.fixture(scope="module")
def promtool() -> str:
    if PROMTOOL is None:
        pytest.skip("needs promtool (see test_promtool_is_installed)")
    return PROMTOOL


def test_promtool_is_installed() -> None:
    """The tests that need promtool skip without it; this one says so, in one line, and fails."""
    if PROMTOOL is None:
        pytest.fail("promtool is not installed: `make setup` installs Debian's prometheus package", pytrace=False)


def test_promtool_check_rules(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 8 rules found" in proc.stdout


def test_promtool_test_rules(promtool: str) -> None:
    proc = subprocess.run(
        [promtool, "test", "rules", str(ROOT / "tests" / "promtool" / "alerts_test.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_test() -> None:
    import yaml

    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = yaml.safe_load((ROOT / "tests" / "promtool" / "alerts_test.yaml").read_text())
    covered = {t["alertname"] for test in tested["tests"] for t in test["alert_rule_test"] if t["exp_alerts"]}
    assert alerts == covered
