"""The soft-limit shift cuts cloud spend in the 80-100 % band by at least 40 % (the original spec's goal)."""

from __future__ import annotations

from budgetflow.streams.dev.simulate import simulate_shift


def test_the_shift_reduces_band_spend_by_at_least_40_percent() -> None:
    result = simulate_shift(requests=60_000, seed=3)
    print(
        f"band spend without {result.without_band_spend}, with {result.with_band_spend}: "
        f"{result.reduction_percent:.1f} % less"
    )
    assert result.without_band_spend > 0
    assert result.reduction_percent >= 40.0
    # Without the shift the band is, by definition, a fifth of the limit (up to one request's cost).
    assert abs(result.without_band_spend - result.limit_pico // 5) < result.limit_pico // 100
