"""The public surface of each package is pinned: changing it is a decision, not an accident."""

from __future__ import annotations

import subprocess
import sys

import budgetflow.schemas
import budgetflow.tokenizers


def test_schemas_public_surface() -> None:
    assert sorted(budgetflow.schemas.__all__) == sorted(
        [
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
    )
    for name in budgetflow.schemas.__all__:
        assert hasattr(budgetflow.schemas, name)


def test_tokenizers_public_surface() -> None:
    assert sorted(budgetflow.tokenizers.__all__) == sorted(
        [
            "Cost",
            "Estimate",
            "Estimator",
            "Price",
            "PriceTable",
            "TokenCount",
            "Tokenizer",
            "TokenizerRegistry",
            "TokenizerRule",
            "estimate_request",
            "heuristic_tokens",
            "price_usage",
            "quick_estimate",
        ]
    )
    for name in budgetflow.tokenizers.__all__:
        assert hasattr(budgetflow.tokenizers, name)


def test_schemas_and_tokenizers_do_not_import_kafka_or_faust() -> None:
    probe = "import sys, budgetflow.schemas, budgetflow.tokenizers; print(sorted(m for m in ('faust', 'aiokafka', 'rocksdict') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
