"""The burn-rate forecast, pinned on known spend histories."""

from __future__ import annotations

import math

import pytest

from budgetflow.streams.rules.forecast import Forecaster

START = 1_000_000.0
END = START + 30 * 86_400
KEY = ("team:a", "2026-11")


def test_before_any_sample_the_period_to_date_average_stands_in() -> None:
    f = Forecaster(window_s=3600)
    # $10 spent in the first 10 days: $1 a day, so $30 at the end of a 30-day month.
    projection = f.forecast(KEY, START + 10 * 86_400, 10 * 10**12, None, START, END)
    assert projection.month_end_pico == pytest.approx(30 * 10**12, rel=1e-9)
    assert projection.hard_limit_at is None


def test_a_constant_rate_projects_exactly_and_names_the_hour_of_the_limit() -> None:
    f = Forecaster(window_s=3600)
    rate = 10**9  # pico-dollars per second
    for i in range(100):
        t = START + 86_400 + i * 60
        f.sample(KEY, t, int(rate * (t - START)), START)
    t = START + 86_400 + 99 * 60
    spend = int(rate * (t - START))
    projection = f.forecast(KEY, t, spend, 100 * 10**12, START, END)
    assert projection.rate_pico_per_s == pytest.approx(rate, rel=1e-6)
    assert projection.month_end_pico == pytest.approx(rate * (END - START), rel=1e-6)
    assert projection.hard_limit_at == pytest.approx(START + 100 * 10**12 / rate, rel=1e-6)


def test_a_burst_fades_with_the_window() -> None:
    window = 3600.0
    f = Forecaster(window_s=window)
    f.sample(KEY, START, 0, START)  # a quiet start: rate 0
    # Then a steady 1e9 pico/s for exactly one window: the smoothed rate covers 1 - 1/e of it.
    spend = 0
    for i in range(1, 61):
        spend += 10**9 * 60
        f.sample(KEY, START + i * 60, spend, START)
    rate = f.forecast(KEY, START + window, spend, None, START, END).rate_pico_per_s
    assert rate == pytest.approx(10**9 * (1 - math.exp(-1)), rel=1e-6)


def test_credits_never_project_negative_spend_and_a_passed_limit_has_no_time() -> None:
    f = Forecaster(window_s=1.0)  # a short window: the refund's negative slope dominates the rate
    f.sample(KEY, START + 10, 10**12, START)
    f.sample(KEY, START + 20, 0, START)
    projection = f.forecast(KEY, START + 20, 0, 10**12, START, END)
    assert projection.rate_pico_per_s == 0.0
    assert projection.month_end_pico == 0
    assert f.forecast(KEY, START + 20, 2 * 10**12, 10**12, START, END).hard_limit_at is None


def test_a_limit_beyond_the_month_is_not_announced() -> None:
    f = Forecaster()
    projection = f.forecast(KEY, START + 86_400, 10**12, 10**15, START, END)
    assert projection.hard_limit_at is None
