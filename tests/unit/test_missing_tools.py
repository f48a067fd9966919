"""Without `make setup`, the unit tests that need helm or promtool say so in one line per file, not with a trace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = ["tests/unit/test_helm_chart.py", "tests/unit/test_alerts.py", "tests/unit/test_dashboard.py"]
HEADER = re.compile(r"^_{3,} (?:ERROR at setup of )?(\S+) _{3,}$")


def test_missing_helm_and_promtool_are_one_line_per_file(tmp_path: Path) -> None:
    # A PATH without promtool (every other tool of /usr/bin is there) and a cache without helm.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name != "promtool":
            (bin_dir / tool.name).symlink_to(tool)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "BUDGETFLOW_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{bin_dir}", HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # it fails (CI must not pass without the tools), as a test run
    # The report of each failing test, by name.
    sections: dict[str, list[str]] = {}
    name = None
    for line in out.splitlines():
        if line.startswith("=" * 10):
            name = None
        elif match := HEADER.match(line):
            name = match.group(1)
            sections[name] = []
        elif name is not None:
            sections[name].append(line)
    about_tools = {
        n: body
        for n, body in sections.items()
        if any("is not built" in line or "promtool is not installed" in line for line in body)
    }
    assert set(about_tools) == {
        "test_helm_is_built",
        "test_promtool_is_installed",
        "test_promql_parses_with_promtool",
    }, out
    for body in about_tools.values():
        assert len(body) == 1, body  # one line: what is missing and what installs it
    # Every other test that needs a tool is skipped, pointing at the one that says why.
    assert re.search(
        r"SKIPPED \[2\d\] tests/unit/test_helm_chart.py:\d+: needs helm \(see test_helm_is_built\)", out
    ), out
    assert "needs promtool (see test_promtool_is_installed)" in out, out
