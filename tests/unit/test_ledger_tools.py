"""Adjustments are refused with the field named before anything is written; a replayed report adds up to the
ledger's own sums (no broker: the entries are built in memory)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.events import LedgerEntry
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import DefaultPolicySettings
from budgetflow.streams.aggregate.ledger import LedgerConfig
from budgetflow.streams.ops.ledger_tools import adjustment_entry, replay_report

NOW = datetime(2026, 12, 3, 12, tzinfo=UTC)
WEEK = 7 * 86_400


def test_an_adjustment_is_a_signed_exact_entry_with_its_own_request() -> None:
    entry = adjustment_entry("team:a", "-12.345", period="2026-11", adjust_id="r1", now=NOW, grace_s=WEEK)
    assert (entry.kind, entry.amount_pico_usd, entry.request_id) == ("adjust", -12_345_000_000_000, "adjust:r1")
    assert entry.entry_id == "adjust:r1:0:adjust:team:a"


@pytest.mark.parametrize(
    ("budget", "usd", "period", "complaint"),
    [
        ("team:a", "0", "2026-12", "0 changes nothing"),
        ("team:a", "1.5e3", "2026-12", "USD"),
        ("team:a", "0.0000000000001", "2026-12", "12 decimals"),
        ("Team A", "1", "2026-12", "budget_id"),
        ("team:a", "1", "2026-13", "period"),
        ("team:a", "1", "2027-01", "has not begun"),
        ("team:a", "1", "2026-10", "closed"),
    ],
)
def test_bad_adjustments_are_refused(budget: str, usd: str, period: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        adjustment_entry(budget, usd, period=period, adjust_id="x", now=NOW, grace_s=WEEK)


def _entry(**fields: object) -> bytes:
    base = {
        "budget_id": "team:a",
        "attempt": 0,
        "period": "2026-12",
        "occurred_at": "2026-12-01T00:00:00Z",
        "model": "m",
        "provider": "p",
        "backend": "cloud",
        "tier": "exact",
    }
    entry = LedgerEntry.model_validate({**base, **fields, "entry_id": f"{fields['request_id']}:{fields['kind']}"})
    return dumps(entry.model_dump(mode="json"))


def test_the_report_attributes_each_change_to_its_request_and_skips_non_entries() -> None:
    records = [
        (0, _entry(request_id="r1", kind="reserve", amount_pico_usd=500, model="big"), 0, None),
        (0, _entry(request_id="r1", kind="settle", amount_pico_usd=300), 1, None),  # replaces the reservation
        (0, _entry(request_id="r1", kind="settle", amount_pico_usd=300), 2, None),  # a duplicate
        (0, b"not json", 3, None),
        (1, _entry(request_id="r2", kind="reserve", amount_pico_usd=70, model="small", tier="heuristic"), 0, None),
        (1, _entry(request_id="adjust:x", kind="adjust", amount_pico_usd=-20, model=""), 1, None),
    ]
    rows, skipped = replay_report(records, LedgerConfig(), DefaultPolicySettings())
    assert skipped == 1
    got = {(r.budget, r.model, r.tier): (r.requests, r.settled, r.reserved) for r in rows}
    assert got == {
        ("team:a", "big", "exact"): (1, 300, 0),
        ("team:a", "small", "heuristic"): (1, 0, 70),
        ("team:a", "(adjustment)", "-"): (1, -20, 0),
    }


def test_the_report_bounds_ticks_as_the_aggregate_does() -> None:
    """A tick from a clock forty days ahead expires nothing in the report, as in the aggregate."""
    from datetime import UTC, datetime

    broker = datetime(2026, 12, 1, tzinfo=UTC).timestamp() + 30  # the broker's time of the tick, plus the skew
    tick = _entry(
        request_id="tick",
        kind="tick",
        budget_id=None,
        period="2027-01",
        amount_pico_usd=0,
        occurred_at="2027-01-10T00:00:00Z",
        expire=True,
    )
    records = [
        (0, _entry(request_id="r1", kind="reserve", amount_pico_usd=500, ttl_s=60), 0, None),
        (0, tick, 1, broker),
    ]
    rows, _ = replay_report(records, LedgerConfig(), DefaultPolicySettings())
    assert [(r.settled, r.reserved) for r in rows] == [(0, 500)]  # still reserved, not expired
