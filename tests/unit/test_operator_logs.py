"""What an operator reads in the logs: one INFO line per budget transition from the aggregate, one DEBUG line
per request from enrich; amounts in decimal USD, and never a prompt."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from budgetflow.schemas.events import LedgerEntry, entry_id
from budgetflow.schemas.money import PICO_PER_USD
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import TopicSettings
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.statuses import StatusPublisher
from budgetflow.streams.aggregate.store import MemoryStore
from budgetflow.streams.enrich.enricher import Enricher
from budgetflow.streams.kafka.topics import Topics
from budgetflow.streams.rules.status import StatusRules
from budgetflow.tokenizers import Estimator, PriceTable, TokenizerRegistry

T0 = datetime(2026, 11, 10, 12, tzinfo=UTC)
POLICY = BudgetPolicy(id="team:x", monthly_limit_usd="100.00", soft_limit_percent=80)  # type: ignore[arg-type]
PROMPT = "PROMPT-SECRET-71c2 the plan"


def policy_for(budget: str) -> BudgetPolicy:
    return POLICY if budget == "team:x" else BudgetPolicy(id=budget)


def entry(kind: str, request: str, usd: int, at: datetime = T0) -> LedgerEntry:
    return LedgerEntry(
        entry_id=entry_id(request, 0, kind, "team:x"),
        budget_id=None if kind == "tick" else "team:x",
        request_id=request,
        kind=kind,  # type: ignore[arg-type]
        period=f"{at.year:04d}-{at.month:02d}",  # type: ignore[arg-type]
        amount_pico_usd=usd * PICO_PER_USD,
        occurred_at=at,
        **({"expire": True} if kind == "tick" else {}),
    )


def transitions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "budgetflow.streams.aggregate.statuses" and r.levelno == logging.INFO
    ]


def test_each_transition_is_one_info_line_with_budget_period_spend_and_limit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="budgetflow.streams.aggregate.statuses")
    ledger = PartitionLedger(0, MemoryStore(), LedgerConfig(), policy_for)
    clock = {"now": T0}
    publisher = StatusPublisher(StatusRules(), policy_for, lambda: clock["now"], refresh_s=60)

    def batch(entries: list[LedgerEntry], start: int) -> None:
        for offset, e in enumerate(entries, start=start):
            ledger.apply(e, offset)
        changes, touched, rollover = ledger.take_outputs()
        publisher.after_batch(ledger, changes, touched, rollover)

    batch([entry("adjust", "a1", 85)], 0)
    batch([entry("adjust", "a2", 20)], 1)
    batch([entry("adjust", "a3", -60)], 2)
    assert transitions(caplog) == [
        "budget team:x reached its soft limit in 2026-11: "
        "spend $85.000000000000 of limit $100.000000000000 (event soft_limit)",
        "budget team:x reached its hard limit in 2026-11: "
        "spend $105.000000000000 of limit $100.000000000000 (event hard_limit)",
        "budget team:x is back to normal in 2026-11: spend $45.000000000000 of limit $100.000000000000 (event normal)",
    ]
    caplog.clear()
    december = datetime(2026, 12, 1, 0, 0, 5, tzinfo=UTC)
    clock["now"] = december
    batch([entry("tick", "tick", 0, at=december)], 3)
    assert transitions(caplog) == [
        "budget team:x rolled over in 2026-12: spend $0.000000000000 of limit $100.000000000000 (event rollover)"
    ]


def test_enrich_logs_each_request_at_debug_with_tokens_and_tier_never_the_prompt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    topics = Topics(TopicSettings())
    enricher = Enricher(Estimator(TokenizerRegistry.default(), PriceTable.default()), topics)
    event: dict[str, Any] = {
        "v": 1,
        "request_id": "r-9",
        "occurred_at": datetime.now(UTC).isoformat(),
        "budgets": ["team:x"],
        "model": "gpt-4o",
        "provider": "openai",
        "backend": "cloud",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    caplog.set_level(logging.DEBUG, logger="budgetflow.streams.enrich.enricher")
    result = enricher.enrich(topics.requests.name, 0, 1, b"r-9", dumps(event))
    assert result.dead is None
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    tokens = enricher.estimator.estimate(enricher_request(event)).input_tokens
    assert f"r-9 attempt 0: {tokens} input tokens (exact)" in line
    assert "gpt-4o" in line
    assert "team:x,global" in line
    assert "PROMPT-SECRET" not in caplog.text
    assert "the plan" not in caplog.text
    caplog.clear()
    caplog.set_level(logging.INFO, logger="budgetflow.streams.enrich.enricher")
    enricher.enrich(topics.requests.name, 0, 2, b"r-9", dumps(event))
    assert not caplog.records, "nothing per request above DEBUG"


def enricher_request(event: dict[str, Any]) -> Any:
    from budgetflow.schemas.events import RequestEvent

    return RequestEvent.model_validate(event)
