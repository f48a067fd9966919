"""Waiting before trying again: one exponential backoff for every retry loop (a worker that lost the broker, a
follower whose fetch failed, a webhook that did not answer)."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["Backoff"]


class Backoff:
    """Delays of ``first`` seconds, doubling up to ``cap``; :meth:`reset` starts over after a success."""

    def __init__(self, first: float = 1.0, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    async def wait(self, stop: asyncio.Event | None = None) -> bool:
        """Sleep the current delay (returning early, True, once ``stop`` is set), then double it."""
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        if stop is None:
            await asyncio.sleep(delay)
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        return stop.is_set()
