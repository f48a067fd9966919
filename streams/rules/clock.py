"""Time for the workers: the wall clock in production, a simulated one in tests and the demo.

The simulated clock maps a wall-clock anchor to a simulated start and runs
``speed`` times faster; processes given the same anchor agree on the time.
Settings refuse it unless ``BUDGETFLOW_TESTING`` is set.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from budgetflow.schemas.settings import ClockSettings

__all__ = ["Clock"]


class Clock:
    """``now()`` as an aware UTC datetime; ``simulated`` tells which kind."""

    def __init__(self, settings: ClockSettings | None = None) -> None:
        settings = settings or ClockSettings()
        self.speed = settings.speed
        self.simulated = settings.start is not None or settings.speed != 1.0
        self._anchor_wall = (settings.anchor or datetime.now(UTC)).timestamp()
        self._start = (settings.start or datetime.fromtimestamp(self._anchor_wall, UTC)).timestamp()

    def timestamp(self) -> float:
        """Seconds since the epoch, simulated or not."""
        if not self.simulated:
            return time.time()
        return self._start + (time.time() - self._anchor_wall) * self.speed

    def at(self, wall: float) -> float:
        """The time this clock read (or will read) when the wall clock read ``wall`` (epoch seconds)."""
        if not self.simulated:
            return wall
        return self._start + (wall - self._anchor_wall) * self.speed

    def tick_bound(self, broker_ms: int, skew_s: float) -> float:
        """The latest time a tick may move stream time to: its record's broker timestamp, on this clock, plus the
        allowed skew (what the aggregate and a report's replay both apply)."""
        return self.at(broker_ms / 1000) + skew_s

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp(), UTC)
