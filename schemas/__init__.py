"""budgetflow's data contracts: settings, errors, and (with the pipeline) the wire events."""

from __future__ import annotations

from budgetflow.schemas.errors import BudgetflowError, ConfigError, InvalidEvent, LocalKafkaError
from budgetflow.schemas.settings import Settings, load_settings

__all__ = [
    "BudgetflowError",
    "ConfigError",
    "InvalidEvent",
    "LocalKafkaError",
    "Settings",
    "load_settings",
]
