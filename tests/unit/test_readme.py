"""The README's settings table is the one the code generates."""

from __future__ import annotations

from pathlib import Path

from budgetflow.streams.cli import settings_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_is_current() -> None:
    text = README.read_text()
    begin, end = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"
    assert begin in text
    assert end in text
    table = text.split(begin, 1)[1].split(end, 1)[0]
    assert table == settings_markdown(), "run `budgetflow settings --write README.md`"
