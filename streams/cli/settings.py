"""`budgetflow settings`: every setting, as a table on the terminal or as the markdown table the docs carry."""

from __future__ import annotations

from pathlib import Path

import click

from budgetflow.schemas.settings import setting_rows

__all__ = ["BEGIN", "END", "settings_cmd", "settings_markdown", "write_settings_table"]

# The markers around the table in a markdown file (docs/operations.md holds it).
BEGIN, END = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"


def settings_markdown() -> str:
    """The settings as a Markdown table (docs/operations.md's copy is checked against it)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, default, description in setting_rows():
        shown = f"`{default}`" if default else ""
        lines.append(f"| `{name}` | {shown} | {description.replace('|', '/')} |")
    return "\n".join(lines)


def write_settings_table(path: Path) -> None:
    """Replace what stands between the settings markers in the markdown file ``path`` with the current table."""
    text = path.read_text()
    head, begin, rest = text.partition(BEGIN)
    if not begin or END not in rest:
        raise click.BadParameter(f"{path} has no settings markers", param_hint="--write")
    path.write_text(head + BEGIN + settings_markdown() + END + rest.split(END, 1)[1])


@click.command("settings")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "markdown"]),
    default="table",
    help="markdown prints the table docs/operations.md carries.",
)
@click.option(
    "--write",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Replace the table between <!-- settings:begin/end --> in this file (docs/operations.md).",
)
def settings_cmd(fmt: str, write: Path | None) -> None:
    """List every setting: environment variable, default, meaning."""
    if write is not None:
        write_settings_table(write)
        return
    if fmt == "markdown":
        click.echo(settings_markdown())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("variable", "default", "meaning", box=None)
    for name, default, description in setting_rows():
        table.add_row(name, default, description)
    Console().print(table)
