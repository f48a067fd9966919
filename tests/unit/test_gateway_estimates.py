"""CostEstimates: X-Budget-Cost-Estimated is enrich's reservation of the model actually called, or of the one refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.settings import Settings
from budgetflow.streams.gateway.estimates import CostEstimates
from budgetflow.streams.gateway.routing import BudgetState, Candidate, decide
from budgetflow.tokenizers import Estimator, PriceTable, TokenizerRegistry

AT = datetime(2026, 11, 20, 12, tzinfo=UTC)
CLOUD = Candidate("gpt-4o", "cloud", 1.0, provider="openai")
LOCAL = Candidate("llama3.1:8b", "local", 0.5, provider="ollama")
MESSAGES = [{"role": "user", "content": "How many tokens is this question, exactly? " * 5}]


@pytest.fixture(scope="module")
def estimates() -> CostEstimates:
    return CostEstimates(Settings())


def soft(u: float, action: str = "warn") -> list[BudgetState]:
    status = "hard_limit" if u >= 100 else "soft_limit"
    limit = 100 * 10**12
    return [BudgetState("team:a", "2026-11", status, int(limit * u / 100), limit, u, 75, action)]  # type: ignore[arg-type]


def test_the_estimate_is_what_enrich_reserves(estimates: CostEstimates) -> None:
    settings = Settings()
    ask = estimates.request(messages=MESSAGES, max_tokens=200, provider="openai", at=AT)
    registry = TokenizerRegistry.default([])
    enrich = Estimator(registry, PriceTable.from_settings(settings.pricing), settings.reservation)
    event = ask.model_copy(update={"model": "gpt-4o", "backend": "cloud", "provider": "openai"})
    assert estimates.of(ask, CLOUD) == enrich.estimate(event).pico_usd > 0
    # A bigger output budget is a bigger reservation: the request's own limits count.
    assert estimates.of(estimates.request(messages=MESSAGES, max_tokens=400, at=AT), CLOUD) > estimates.of(ask, CLOUD)


def test_a_shifted_request_is_estimated_on_the_local_model_and_its_fallback_on_cloud(estimates: CostEstimates) -> None:
    ask = estimates.request(messages=MESSAGES, max_tokens=200, at=AT)
    paid_local = Candidate("big-local", "local", 0.5, provider="vllm")
    decisions = [decide(f"r-{i}", soft(95.0), [CLOUD, LOCAL]) for i in range(50)]
    shifted = next(d for d in decisions if not d.cloud_allowed)
    kept = next(d for d in decisions if d.cloud_allowed)
    assert estimates.for_decision(ask, shifted, [CLOUD, LOCAL]) == 0  # a free local model
    assert estimates.for_decision(ask, kept, [CLOUD, LOCAL]) == estimates.of(ask, CLOUD) > 0
    assert estimates.of(ask, shifted.fallbacks[0]) == estimates.of(ask, CLOUD)
    # A local model that is not free is estimated at its own price, not the cloud model's.
    other = next(
        d for d in (decide(f"r-{i}", soft(95.0), [CLOUD, paid_local]) for i in range(50)) if not d.cloud_allowed
    )
    assert estimates.for_decision(ask, other, [CLOUD, paid_local]) == estimates.of(ask, paid_local)


def test_a_rejection_carries_the_estimate_of_what_was_refused(estimates: CostEstimates) -> None:
    ask = estimates.request(messages=MESSAGES, max_tokens=200, at=AT)
    refused = decide("r", soft(120.0, "block_all"), [LOCAL, CLOUD])
    assert refused.rejection is not None
    assert estimates.for_decision(ask, refused, [LOCAL, CLOUD]) == estimates.of(ask, CLOUD) > 0
    no_local = decide("r", soft(120.0, "block_cloud"), [CLOUD])
    assert no_local.rejection is not None
    assert estimates.for_decision(ask, no_local, [CLOUD]) == estimates.of(ask, CLOUD)


def test_a_bad_request_is_refused_as_the_publisher_would(estimates: CostEstimates) -> None:
    with pytest.raises(InvalidEvent):
        estimates.request(messages=[{"role": "user", "content": "x"}], max_tokens=-1, at=AT)
