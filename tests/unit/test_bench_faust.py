"""The Faust bench without a broker: its pin, its isolation from budgetflow, its scoring and its tables."""

from __future__ import annotations

import ast
import tomllib
from collections import Counter
from pathlib import Path

from budgetflow.streams.dev.bench_faust import SETTLE_PICO, _score
from budgetflow.streams.dev.bench_report import render
from budgetflow.streams.dev.faust_worker import FAUST_REQUIREMENT

ROOT = Path(__file__).resolve().parents[2]


def test_the_extra_pins_the_faust_the_bench_installs() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["bench-faust"] == [FAUST_REQUIREMENT]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in dependencies if d.startswith("faust")], "Faust is never a runtime dependency"


def test_only_the_faust_app_imports_faust() -> None:
    """The app runs in a venv of its own, by its path: no module of budgetflow imports it, or Faust."""
    found = []
    for folder in ("streams", "schemas", "tokenizers", "integrations"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
                if any(n == "faust" or n.startswith("faust.") or n.endswith("faust_app") for n in names):
                    found.append(str(path.relative_to(ROOT)))
    assert found == ["streams/dev/faust_app.py"]


def test_score_counts_lost_and_doubled_settles() -> None:
    expected = Counter({"a": 3, "b": 2, "c": 1})
    found = {
        "a": (3 * SETTLE_PICO, 0, 3),  # exact
        "b": (1 * SETTLE_PICO, 1_000_000_000, 1),  # a settle lost: its reservation left open
        "c": (2 * SETTLE_PICO, -1_000_000_000, 2),  # a settle counted twice
    }
    assert _score(expected, found) == {
        "exact": False,
        "budgets": 3,
        "wrong_budgets": 2,
        "settles_lost": 1,
        "settles_doubled": 1,
        "settled_error_pico": 2 * SETTLE_PICO,
        "reserved_left_pico": 2_000_000_000,
    }
    assert _score(expected, {b: (n * SETTLE_PICO, 0, n) for b, n in expected.items()})["exact"] is True
    assert _score(expected, {})["settles_lost"] == 6, "a budget missing altogether is wrong too"


def _kill_row(exact: bool, stalls: list[str]) -> dict[str, object]:
    row: dict[str, object] = {"exact": exact, "budgets": 100, "wrong_budgets": 0 if exact else 2}
    row |= {"settles_lost": 0 if exact else 2, "settles_doubled": 0, "settled_error_pico": 0}
    row |= {"reserved_left_pico": 0, "killed_at_committed": [1, 2], "committed_at_end": [9_005, 50_000]}
    return row | {"stalls": stalls, "elapsed_s": 1.0}


def test_every_row_of_the_faust_tables_has_its_headers_cells() -> None:
    throughput = {"entries": 200_000, "budgets": 1000, "raw_consumer_per_s": 3e5}
    throughput["aggregate"] = {"per_s": 5e4, "ratio": 0.17, "exact": True}
    throughput["faust"] = {"per_s": 3000.0, "ratio": 0.01, "exact": True}
    kills = {"entries": 50_000, "budgets": 100, "feed_per_s": 1000.0}
    kills |= {"budgetflow": _kill_row(True, []), "faust": _kill_row(False, ["no commit | within 60 s\nof x"])}
    kills["faust"]["settles_lost_for_good"] = 1
    crashed = {"per_s": None, "failed": "Crashed reason=X | y", "ratio": None, "exact": False, "take": 2000}
    for take in (crashed, {"per_s": 900.0, "ratio": 0.003, "exact": True, "take": 2000}):
        section = {"faust": FAUST_REQUIREMENT, "throughput": throughput | {"faust_take": take}, "kill9": kills}
        text = render({"date": "2026-12-02", "quick": False, "sections": {"faust": section}})
        tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
        assert [len(table) for table in tables] == [6, 4], text
        for table in tables:
            assert {row.count("|") for row in table} == {table[0].count("|")}, "\n".join(table)
    skipped = render({"date": "d", "quick": True, "sections": {"faust": {"skipped": "no venv"}}})
    assert "faust: skipped (no venv)" in skipped
