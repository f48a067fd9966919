"""The wire events: version, usage rule, budget ids, times, unknown fields."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import (
    BudgetStatus,
    LedgerEntry,
    RequestEvent,
    UsageEvent,
    entry_id,
    period_of,
)
from budgetflow.schemas.serde import decode, dumps, loads


def request(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1,
        "request_id": "req-1",
        "occurred_at": "2026-11-29T10:00:00Z",
        "budgets": ["team:search"],
        "model": "gpt-4o",
        "provider": "openai",
        "backend": "cloud",
        "messages": [{"role": "user", "content": "hello"}],
    }
    base.update(overrides)
    return base


def usage(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1,
        "request_id": "req-1",
        "request_occurred_at": "2026-11-30T23:59:59+00:00",
        "occurred_at": "2026-12-01T00:00:03Z",
        "model": "gpt-4o",
        "provider": "openai",
        "backend": "cloud",
        "outcome": "completed",
        "input_tokens": 100,
        "cached_input_tokens": 40,
        "cache_write_input_tokens": 10,
        "output_tokens": 50,
        "reasoning_tokens": 20,
    }
    base.update(overrides)
    return base


def raw(data: dict[str, Any]) -> bytes:
    return dumps(data)


def test_a_valid_request_decodes() -> None:
    event, unknown = decode(RequestEvent, raw(request()))
    assert event.request_id == "req-1"
    assert event.attempt == 0
    assert event.occurred_at == datetime(2026, 11, 29, 10, tzinfo=UTC)
    assert unknown == ()


def test_unknown_fields_are_ignored_and_reported() -> None:
    event, unknown = decode(RequestEvent, raw(request(x_trace="abc", zeta=1)))
    assert event.request_id == "req-1"
    assert unknown == ("x_trace", "zeta")


@pytest.mark.parametrize(
    ("data", "reason", "field"),
    [
        (request(v=2), "version", "v"),
        (request(v="1"), "version", "v"),
        (request(request_id=""), "invalid", "request_id"),
        (request(budgets=["Team Search"]), "invalid", "budgets"),
        (request(budgets=["-leading"]), "invalid", "budgets"),
        (request(occurred_at="2026-11-29T10:00:00"), "invalid", "occurred_at"),
        (request(occurred_at="1970-01-01T00:00:00Z"), "invalid", "occurred_at"),
        (request(backend="edge"), "invalid", "backend"),
        (request(prompt="hi"), "invalid", "exactly one of"),
        (request(messages=None), "invalid", "exactly one of"),
        (request(max_tokens=-1), "out_of_range", "max_tokens"),
        (request(max_tokens=1.5), "invalid", "max_tokens"),
        (usage(cached_input_tokens=95), "usage_rule", "cached_input_tokens"),
        (usage(reasoning_tokens=51), "usage_rule", "reasoning_tokens"),
        (usage(input_tokens=-1, cached_input_tokens=0, cache_write_input_tokens=0), "out_of_range", "input_tokens"),
        (usage(output_tokens=10**12), "out_of_range", "output_tokens"),
        (usage(output_tokens=50.0), "invalid", "output_tokens"),
        (usage(outcome="done"), "invalid", "outcome"),
    ],
)
def test_invalid_events_say_which_field_and_why(data: dict[str, Any], reason: str, field: str) -> None:
    model = UsageEvent if "outcome" in data else RequestEvent
    with pytest.raises(InvalidEvent) as info:
        decode(model, raw(data))
    assert info.value.reason == reason
    assert field in str(info.value)


def test_error_messages_never_echo_content() -> None:
    secret = "my password is hunter2"
    with pytest.raises(InvalidEvent) as info:
        decode(RequestEvent, raw(request(messages=[{"role": 5, "content": secret}])))
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(None, "empty"), (b"", "empty"), (b"{not json", "json"), (b"[1,2]", "not_object"), (b'{"v": NaN}', "json")],
)
def test_undecodable_records(payload: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(RequestEvent, payload)
    assert info.value.reason == reason


def test_usage_period_comes_from_the_request_time() -> None:
    event, _ = decode(UsageEvent, raw(usage()))
    assert event.period == "2026-11"
    assert period_of(event.occurred_at) == "2026-12"


def test_offsets_are_normalised_to_utc() -> None:
    event, _ = decode(RequestEvent, raw(request(occurred_at="2026-12-01T01:30:00+02:00")))
    assert event.occurred_at == datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
    assert event.period == "2026-11"


def test_entry_ids_are_deterministic() -> None:
    assert entry_id("req-1", 2, "settle", "team:a") == "req-1:2:settle:team:a"


def test_budget_status_carries_usd_as_strings() -> None:
    status = BudgetStatus(
        budget_id="global",
        period="2026-11",
        status="soft_limit",
        spend_usd=80 * 10**12,
        settled_usd=70 * 10**12,
        reserved_usd=10 * 10**12,
        limit_usd=100 * 10**12,
        remaining_usd=20 * 10**12,
        utilization_percent=80.0,
        soft_limit_percent=75,
        hard_limit_action="block_cloud",
        as_of=datetime(2026, 11, 29, tzinfo=UTC),
        next_reset=datetime(2026, 12, 1, tzinfo=UTC),
        reason="threshold",
        partition=3,
        seq=41,
    )
    wire = loads(dumps(status))
    assert wire["spend_usd"] == "80.000000000000"
    assert wire["limit_usd"] == "100.000000000000"
    assert wire["v"] == 1
    again, _ = decode(BudgetStatus, dumps(status))
    assert again == status


@given(
    input_tokens=st.integers(0, 10**6),
    cached=st.integers(0, 10**6),
    write=st.integers(0, 10**6),
    output=st.integers(0, 10**6),
    reasoning=st.integers(0, 10**6),
)
def test_usage_rule_is_exactly_the_subset_rule(
    input_tokens: int, cached: int, write: int, output: int, reasoning: int
) -> None:
    data = usage(
        input_tokens=input_tokens,
        cached_input_tokens=cached,
        cache_write_input_tokens=write,
        output_tokens=output,
        reasoning_tokens=reasoning,
    )
    valid = cached + write <= input_tokens and reasoning <= output
    if valid:
        event, _ = decode(UsageEvent, raw(data))
        assert event.input_tokens == input_tokens
    else:
        with pytest.raises(InvalidEvent) as info:
            decode(UsageEvent, raw(data))
        assert info.value.reason == "usage_rule"


def test_ledger_entry_amount_must_be_an_int() -> None:
    base = {
        "entry_id": "r:0:settle:global",
        "budget_id": "global",
        "request_id": "r",
        "kind": "settle",
        "period": "2026-11",
        "occurred_at": "2026-11-01T00:00:00Z",
    }
    assert decode(LedgerEntry, raw({**base, "amount_pico_usd": 12}))[0].amount_pico_usd == 12
    with pytest.raises(InvalidEvent):
        decode(LedgerEntry, raw({**base, "amount_pico_usd": 12.0}))
    with pytest.raises(InvalidEvent):
        decode(LedgerEntry, raw({**base, "amount_pico_usd": 1, "period": "2026-13"}))
