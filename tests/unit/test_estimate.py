"""Reservations follow the rule of docs/architecture.md ("Reservations") exactly and deterministically."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from budgetflow.schemas.events import RequestEvent, UsageEvent
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import ReservationSettings, TokenizerSettings
from budgetflow.tokenizers import Estimator, PriceTable, TokenizerRegistry, estimate_request, price_usage
from budgetflow.tokenizers.registry import heuristic_tokens

REGISTRY = TokenizerRegistry.default()
TABLE = PriceTable.default()
ESTIMATOR = Estimator(REGISTRY, TABLE)


def request(**overrides: Any) -> RequestEvent:
    base: dict[str, Any] = {
        "request_id": "r",
        "occurred_at": datetime(2026, 11, 29, tzinfo=UTC),
        "model": "gpt-4o",
        "provider": "openai",
        "backend": "cloud",
        "messages": [{"role": "user", "content": "hello there"}],
    }
    base.update(overrides)
    return RequestEvent.model_validate(base)


def test_reservation_is_input_plus_capped_output_times_n() -> None:
    event = request(max_tokens=100_000, n=2)
    estimate = ESTIMATOR.estimate(event)
    chat = REGISTRY.count_chat("gpt-4o", event.messages or [])
    assert estimate.input_tokens == chat.tokens
    assert estimate.output_tokens == 16384 * 2  # capped by gpt-4o's max_output_tokens
    assert estimate.pico_usd == chat.tokens * 2_500_000 + 16384 * 2 * 10_000_000
    assert (estimate.tier, estimate.priced, estimate.ttl_s) == ("exact", True, 3600)


def test_max_completion_tokens_wins_then_max_tokens_then_the_default() -> None:
    assert ESTIMATOR.estimate(request(max_completion_tokens=10, max_tokens=99)).output_tokens == 10
    assert ESTIMATOR.estimate(request(max_tokens=99)).output_tokens == 99
    assert ESTIMATOR.estimate(request()).output_tokens == ReservationSettings().default_output_tokens


def test_approximate_input_reserves_with_the_margin_rounding_up() -> None:
    event = request(model="claude-sonnet-4-5", provider="anthropic", max_tokens=7)
    estimate = ESTIMATOR.estimate(event)
    assert estimate.tier == "approximate"
    raw = estimate.input_tokens * 3_000_000 + 7 * 15_000_000
    assert estimate.pico_usd == -(-raw * 6 // 5)


def test_tools_count_as_input_and_make_it_approximate() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    plain = ESTIMATOR.estimate(request())
    with_tools = ESTIMATOR.estimate(request(tools=tools))
    assert with_tools.input_tokens == plain.input_tokens + REGISTRY.count_text("gpt-4o", dumps(tools).decode()).tokens
    assert with_tools.tier == "approximate"


def test_input_bytes_are_counted_by_the_heuristic() -> None:
    estimate = ESTIMATOR.estimate(request(messages=None, input_bytes=4000, max_tokens=0))
    assert (estimate.input_tokens, estimate.tier) == (heuristic_tokens(4000), "heuristic")
    assert estimate.pico_usd == heuristic_tokens(4000) * 2_500_000


def test_a_prompt_over_max_prompt_bytes_is_counted_on_its_length() -> None:
    estimator = Estimator(REGISTRY, TABLE, tokenizers=TokenizerSettings(max_prompt_bytes=2048))
    long_prompt = "word " * 1000
    estimate = estimator.estimate(request(messages=None, prompt=long_prompt))
    assert (estimate.input_tokens, estimate.tier) == (heuristic_tokens(5000), "heuristic")
    assert ESTIMATOR.estimate(request(messages=None, prompt=long_prompt)).tier == "exact"


def test_unpriced_models_reserve_at_the_fallback() -> None:
    estimate = ESTIMATOR.estimate(request(model="brand-new-model", max_tokens=10))
    assert not estimate.priced
    assert estimate.pico_usd == estimate.input_tokens * TABLE.fallback.input + 10 * TABLE.fallback.output


def test_estimates_are_deterministic() -> None:
    event = request(max_tokens=50)
    assert estimate_request(event, REGISTRY, TABLE) == estimate_request(event, TokenizerRegistry.default(), TABLE)


def test_price_usage_is_the_table_cost() -> None:
    event = UsageEvent.model_validate(
        {
            "request_id": "r",
            "request_occurred_at": "2026-11-01T00:00:00Z",
            "occurred_at": "2026-11-01T00:00:01Z",
            "model": "o3",
            "provider": "openai",
            "backend": "cloud",
            "outcome": "completed",
            "input_tokens": 100,
            "cached_input_tokens": 20,
            "output_tokens": 300,
            "reasoning_tokens": 250,
        }
    )
    cost = price_usage(event, TABLE)
    assert cost == TABLE.cost(
        "o3", input_tokens=100, cached_input_tokens=20, output_tokens=300, reasoning_tokens=250, provider="openai"
    )
