"""Budget periods: UTC calendar months written ``YYYY-MM``, and the arithmetic on them (the only place it is done).

A budget's spend resets at the first instant of each month, UTC; a ledger entry belongs to the month of its
event time (docs/architecture.md, "Time through the stream").
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["month_start", "next_month_start", "period_of", "shift_period"]


def period_of(moment: datetime) -> str:
    """The budget period (UTC calendar month) of an instant: ``YYYY-MM``."""
    moment = moment.astimezone(UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


def _month_index(period: str) -> int:
    return int(period[:4]) * 12 + int(period[5:7]) - 1


def _period_at(index: int) -> str:
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def shift_period(period: str, months: int) -> str:
    """The period ``months`` after ``period`` (before it when negative)."""
    return _period_at(_month_index(period) + months)


def month_start(period: str) -> datetime:
    """The first instant of a ``YYYY-MM`` period, UTC."""
    index = _month_index(period)
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def next_month_start(period: str) -> datetime:
    """The first instant after a ``YYYY-MM`` period, UTC: when its budgets reset."""
    return month_start(shift_period(period, 1))
