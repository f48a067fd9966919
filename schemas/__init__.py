"""budgetflow's data contracts: wire events, policies, money, settings and errors."""

from __future__ import annotations

from budgetflow.schemas.errors import BudgetflowError, ConfigError, InvalidEvent, LocalKafkaError
from budgetflow.schemas.events import (
    GLOBAL_BUDGET,
    BudgetStatus,
    ChatMessage,
    Heartbeat,
    LedgerEntry,
    RequestEvent,
    UsageEvent,
    entry_id,
)
from budgetflow.schemas.jsonschema import export_json_schemas
from budgetflow.schemas.money import PICO_PER_USD, format_usd, parse_usd, pico_to_float_usd, usd_string
from budgetflow.schemas.periods import period_of
from budgetflow.schemas.policy import BudgetPolicy, PolicyFile, parse_policy_file
from budgetflow.schemas.serde import decode, dumps
from budgetflow.schemas.settings import Settings, load_settings

__all__ = [
    "GLOBAL_BUDGET",
    "PICO_PER_USD",
    "BudgetPolicy",
    "BudgetStatus",
    "BudgetflowError",
    "ChatMessage",
    "ConfigError",
    "Heartbeat",
    "InvalidEvent",
    "LedgerEntry",
    "LocalKafkaError",
    "PolicyFile",
    "RequestEvent",
    "Settings",
    "UsageEvent",
    "decode",
    "dumps",
    "entry_id",
    "export_json_schemas",
    "format_usd",
    "load_settings",
    "parse_policy_file",
    "parse_usd",
    "period_of",
    "pico_to_float_usd",
    "usd_string",
]
