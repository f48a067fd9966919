"""Prices that change: entries with valid_from are chosen by the request's time; a provider's reported cost is
taken only from trusted providers."""

from __future__ import annotations

from datetime import UTC, datetime

from budgetflow.schemas.events import UsageEvent
from budgetflow.schemas.settings import PricingSettings
from budgetflow.tokenizers import PriceTable, TokenizerRegistry
from budgetflow.tokenizers.estimate import Estimator
from budgetflow.tokenizers.pricing import _read_price_file

OVERRIDE = """
as_of: "2026-11-01"
models:
  - {match: "acme-1", provider: acme, input_usd_per_mtok: "1.00", output_usd_per_mtok: "2.00"}
  - {match: "acme-1", provider: acme, input_usd_per_mtok: "0.50", output_usd_per_mtok: "1.00",
     valid_from: "2026-11-15T00:00:00Z"}
  - {match: "acme-1", provider: acme, input_usd_per_mtok: "0.25", output_usd_per_mtok: "0.50",
     valid_from: "2026-12-01T00:00:00Z"}
"""


def table() -> PriceTable:
    return PriceTable([_read_price_file(OVERRIDE, "test", "override"), PriceTable.shipped_file()])


def test_the_entry_in_force_at_the_request_time_prices_it() -> None:
    t = table()
    at = {d: datetime(2026, 11, d, tzinfo=UTC) for d in (1, 14, 15, 30)}
    assert t.price("acme-1", provider="acme", at=at[1]).input == 1_000_000
    assert t.price("acme-1", provider="acme", at=at[14]).input == 1_000_000
    assert t.price("acme-1", provider="acme", at=at[15]).input == 500_000
    assert t.price("acme-1", provider="acme", at=at[30]).input == 500_000
    assert t.price("acme-1", provider="acme", at=datetime(2027, 1, 1, tzinfo=UTC)).input == 250_000
    # Each version says which entry priced it.
    assert t.price("acme-1", provider="acme", at=at[1]).version != t.price("acme-1", provider="acme", at=at[15]).version
    assert t.price("acme-1", provider="acme", at=at[15]).version.endswith("@2026-11-15T00:00:00Z")


def usage(**fields: object) -> UsageEvent:
    base = {
        "request_id": "r",
        "request_occurred_at": "2026-11-20T00:00:00Z",
        "occurred_at": "2026-11-20T00:00:05Z",
        "model": "acme-1",
        "provider": "acme",
        "backend": "cloud",
        "outcome": "completed",
        "input_tokens": 1000,
        "output_tokens": 100,
    }
    return UsageEvent.model_validate({**base, **fields})


def test_usage_is_priced_by_its_request_time_not_its_own() -> None:
    estimator = Estimator(TokenizerRegistry([]), table())
    late = usage(request_occurred_at="2026-11-14T23:59:59Z", occurred_at="2026-11-15T00:00:10Z")
    assert estimator.price_usage(late).pico_usd == 1000 * 1_000_000 + 100 * 2_000_000


def test_a_reported_cost_counts_only_for_trusted_providers() -> None:
    event = usage(reported_cost_usd="0.123")
    plain = Estimator(TokenizerRegistry([]), table())
    assert plain.price_usage(event).pico_usd == 1000 * 500_000 + 100 * 1_000_000
    trusting = Estimator(TokenizerRegistry([]), table(), pricing=PricingSettings(trust_reported_cost=["ACME"]))
    cost = trusting.price_usage(event)
    assert (cost.pico_usd, cost.price_version) == (123_000_000_000, "reported:acme")
