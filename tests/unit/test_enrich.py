"""The enrich stage, without a broker: entries per budget, deterministic ids, dead letters, no prompt text."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from budgetflow.schemas.events import LedgerEntry
from budgetflow.schemas.serde import decode_fast, dumps
from budgetflow.schemas.settings import TopicSettings
from budgetflow.streams.enrich.enricher import Enricher
from budgetflow.streams.kafka.topics import Topics
from budgetflow.tokenizers import Estimator, PriceTable, TokenizerRegistry

TOPICS = Topics(TopicSettings())
ENRICHER = Enricher(Estimator(TokenizerRegistry.default(), PriceTable.default()), TOPICS)
NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)


def request(**overrides: object) -> bytes:
    event = {
        "v": 1,
        "request_id": "r-1",
        "attempt": 2,
        "occurred_at": NOW.isoformat(),
        "budgets": ["team:a", "global"],
        "model": "gpt-4o",
        "provider": "openai",
        "backend": "cloud",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "the secret plan is X"}],
        **overrides,
    }
    return dumps(event)


def test_a_request_becomes_one_reserve_per_budget_with_global_once() -> None:
    result = ENRICHER.enrich(TOPICS.requests.name, 0, 5, b"r-1", request())
    assert [budget for budget, _ in result.entries] == ["team:a", "global"]
    entries = [decode_fast(LedgerEntry, raw) for _, raw in result.entries]
    assert [e.entry_id for e in entries] == ["r-1:2:reserve:team:a", "r-1:2:reserve:global"]
    assert all(e.kind == "reserve" and e.period == "2026-11" and e.amount_pico_usd > 0 for e in entries)
    assert all(b"secret plan" not in raw for _, raw in result.entries)
    # Where the request event was: the statuses that count these reserves will say they cover it.
    assert {(e.source_partition, e.source_offset) for e in entries} == {(0, 5)}


def test_the_fast_entry_json_is_what_the_model_would_write() -> None:
    (_, raw), _ = ENRICHER.enrich(TOPICS.requests.name, 0, 5, b"r-1", request()).entries
    fast = decode_fast(LedgerEntry, raw)
    assert fast == LedgerEntry.model_validate(orjson.loads(dumps(fast)))
    assert orjson.loads(raw).keys() <= LedgerEntry.model_fields.keys()


def test_usage_becomes_a_settle_with_the_request_time() -> None:
    usage = {
        "v": 1,
        "request_id": "r-1",
        "request_occurred_at": "2026-10-31T23:59:00Z",
        "occurred_at": "2026-11-01T00:00:05Z",
        "model": "gpt-4o",
        "provider": "openai",
        "backend": "cloud",
        "outcome": "completed",
        "input_tokens": 1000,
        "output_tokens": 100,
    }
    result = ENRICHER.enrich(TOPICS.usage.name, 0, 1, b"r-1", dumps(usage))
    ((budget, raw),) = result.entries
    entry = decode_fast(LedgerEntry, raw)
    assert (budget, entry.kind, entry.period, entry.tier) == ("global", "settle", "2026-10", "reported")
    assert entry.amount_pico_usd == 1000 * 2_500_000 + 100 * 10_000_000
    assert (entry.source_partition, entry.source_offset) == (0, 1)  # the usage event's place on its topic


def test_a_bad_request_is_a_redacted_dead_letter() -> None:
    result = ENRICHER.enrich(TOPICS.requests.name, 3, 9, b"r-1", request(max_tokens="many"))
    assert result.entries == []
    assert result.dead is not None
    assert result.dead.reason == "invalid"
    assert b"secret plan" not in result.dead.value
    headers = dict(result.dead.headers())
    assert headers["budgetflow.source.offset"] == b"9"
    assert b"max_tokens" in headers["budgetflow.error"]


def test_events_from_beyond_the_clock_skew_are_future_dead_letters() -> None:
    from datetime import timedelta

    from budgetflow.schemas.settings import ClockSettings
    from budgetflow.streams.rules.clock import Clock

    clock = Clock(ClockSettings(start=NOW, speed=1.0))
    enricher = Enricher(ENRICHER.estimator, TOPICS, clock=clock, max_clock_skew_s=300)
    soon = enricher.enrich(
        TOPICS.requests.name, 0, 1, b"r", request(occurred_at=(NOW + timedelta(seconds=200)).isoformat())
    )
    assert soon.dead is None
    later = enricher.enrich(
        TOPICS.requests.name, 0, 2, b"r", request(occurred_at=(NOW + timedelta(days=3)).isoformat())
    )
    assert later.dead is not None
    assert later.dead.reason == "future"
    assert later.entries == []
