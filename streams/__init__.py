"""budgetflow's moving parts: what gateways import, and the workers behind it.

A gateway imports only this package's top level: the publisher, the view and
the routing types. None of them imports Faust or RocksDB (a test checks).
The workers live in submodules (`budgetflow.streams.aggregate.worker`, ...).
"""

from __future__ import annotations

from budgetflow.streams.gateway.publisher import BudgetPublisher, RequestHandle, SpoolFull, SyncBudgetPublisher
from budgetflow.streams.gateway.routing import BudgetExceeded, BudgetState, Candidate, Decision, affinity, cloud_share
from budgetflow.streams.gateway.usage import Usage, from_anthropic, from_gemini, from_openai
from budgetflow.streams.gateway.view import BudgetView

__all__ = [
    "BudgetExceeded",
    "BudgetPublisher",
    "BudgetState",
    "BudgetView",
    "Candidate",
    "Decision",
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
