"""Token counting and pricing, installed as ``budgetflow.tokenizers``.

Installed under the ``budgetflow`` namespace so that it never shadows
HuggingFace's ``tokenizers`` package in a user's environment.
"""

from __future__ import annotations

from budgetflow.tokenizers.estimate import Estimate, Estimator, estimate_request, price_usage, quick_estimate
from budgetflow.tokenizers.pricing import Cost, Price, PriceTable
from budgetflow.tokenizers.registry import (
    TokenCount,
    Tokenizer,
    TokenizerRegistry,
    TokenizerRule,
    heuristic_tokens,
)

__all__ = [
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
