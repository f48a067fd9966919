"""Burn rate and forecast per budget: where the month will end, and when the limit falls.

The rate is an exponentially weighted average of the spend's slope over
recent samples (time constant ``window_s``), so a burst counts for about a
window and then fades; before a budget's first sample the period-to-date
average stands in. Samples are taken on stream time (ticks), so a replay
forecasts alike. Kept in memory: after a restart a budget starts again from
its period-to-date average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Forecast", "Forecaster"]


@dataclass(frozen=True, slots=True)
class Forecast:
    """USD in pico-dollars; times in epoch seconds."""

    rate_pico_per_s: float
    month_end_pico: int
    hard_limit_at: float | None


@dataclass(slots=True)
class _Burn:
    t: float
    spend: int
    rate: float


class Forecaster:
    """Per budget: the last sample and the smoothed burn rate."""

    def __init__(self, window_s: float = 6 * 3600) -> None:
        self.window_s = window_s
        self._burn: dict[tuple[str, str], _Burn] = {}

    def sample(self, key: tuple[str, str], t: float, spend: int, period_start: float) -> None:
        """Record the spend of (budget, period) at stream time ``t``."""
        burn = self._burn.get(key)
        if burn is None:
            elapsed = max(t - period_start, 1.0)
            self._burn[key] = _Burn(t, spend, max(spend, 0) / elapsed)
            return
        dt = t - burn.t
        if dt <= 0:
            return
        slope = (spend - burn.spend) / dt
        alpha = 1 - math.exp(-dt / self.window_s)
        burn.rate = alpha * slope + (1 - alpha) * burn.rate
        burn.t, burn.spend = t, spend

    def forecast(
        self, key: tuple[str, str], t: float, spend: int, limit: int | None, period_start: float, period_end: float
    ) -> Forecast:
        """Spend at the end of the period, and when it reaches ``limit`` (None if not this period)."""
        burn = self._burn.get(key)
        rate = burn.rate if burn is not None else max(spend, 0) / max(t - period_start, 1.0)
        rate = max(rate, 0.0)  # credits do not make a budget earn money
        remaining_s = max(period_end - t, 0.0)
        month_end = spend + int(rate * remaining_s)
        hard_at: float | None = None
        if limit is not None and spend < limit and rate > 0:
            at = t + (limit - spend) / rate
            hard_at = at if at < period_end else None
        return Forecast(rate, month_end, hard_at)

    def forget(self, keys: list[tuple[str, str]]) -> None:
        for key in keys:
            self._burn.pop(key, None)
