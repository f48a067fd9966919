"""`budgetflow schema`: the wire contract as JSON Schema."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["schema"]


@click.group()
def schema() -> None:
    """The wire contract as JSON Schema, for gateways in other languages."""


@schema.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def schema_export(directory: Path) -> None:
    """Write one <Event>.schema.json per wire event into DIRECTORY."""
    from budgetflow.schemas.jsonschema import export_json_schemas

    for path in export_json_schemas(directory):
        click.echo(str(path))
