"""budgetflow's moving parts: what gateways import, and the workers behind it.

A gateway imports only this package's top level: the publisher, the view, usage extraction and the routing
types. They load on first use, so importing any ``budgetflow.streams`` module loads nothing else, and none of
them loads worker or operator code (``tests/unit/test_architecture.py`` checks). The sub-packages and their
layers are drawn in docs/architecture.md ("Code layout").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from budgetflow.streams.gateway.estimates import CostEstimates
    from budgetflow.streams.gateway.publisher import BudgetPublisher, RequestHandle, SpoolFull
    from budgetflow.streams.gateway.routing import (
        BudgetState,
        Candidate,
        Decision,
        Rejection,
        affinity,
        cloud_share,
    )
    from budgetflow.streams.gateway.sync_publisher import SyncBudgetPublisher
    from budgetflow.streams.gateway.usage import Usage, from_anthropic, from_gemini, from_openai
    from budgetflow.streams.gateway.view import BudgetView

_HOMES = {
    "CostEstimates": "estimates",
    "BudgetPublisher": "publisher",
    "RequestHandle": "publisher",
    "SpoolFull": "publisher",
    "SyncBudgetPublisher": "sync_publisher",
    "Rejection": "routing",
    "BudgetState": "routing",
    "Candidate": "routing",
    "Decision": "routing",
    "affinity": "routing",
    "cloud_share": "routing",
    "Usage": "usage",
    "from_anthropic": "usage",
    "from_gemini": "usage",
    "from_openai": "usage",
    "BudgetView": "view",
}

__all__ = [
    "BudgetPublisher",
    "BudgetState",
    "BudgetView",
    "Candidate",
    "CostEstimates",
    "Decision",
    "Rejection",
    "RequestHandle",
    "SpoolFull",
    "SyncBudgetPublisher",
    "Usage",
    "affinity",
    "cloud_share",
    "from_anthropic",
    "from_gemini",
    "from_openai",
]
assert sorted(__all__) == sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'budgetflow.streams' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"budgetflow.streams.gateway.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
