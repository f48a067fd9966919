"""JSON Schema of every wire event, for gateways written in other languages."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from budgetflow.schemas.events import AuditRecord, BudgetStatus, Heartbeat, LedgerEntry, RequestEvent, UsageEvent
from budgetflow.schemas.policy import PolicyFile

__all__ = ["SCHEMAS", "export_json_schemas"]

SCHEMAS: dict[str, type[BaseModel]] = {
    "RequestEvent": RequestEvent,
    "UsageEvent": UsageEvent,
    "LedgerEntry": LedgerEntry,
    "BudgetStatus": BudgetStatus,
    "Heartbeat": Heartbeat,
    "PolicyFile": PolicyFile,
    "AuditRecord": AuditRecord,
}


def export_json_schemas(directory: str | Path) -> list[Path]:
    """Write ``<Name>.schema.json`` for each event into ``directory``; return the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in SCHEMAS.items():
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://budgetflow.dev/schemas/v1/{name}.schema.json"
        path = out / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
