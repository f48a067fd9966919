"""What one router let through to cloud models, counted until the pipeline's statuses count it.

Between two statuses of a budget, a router adds the cloud spend it admitted to the last status it read, so that
it alone cannot overrun what remains. An admission stops counting when a status of its budget *covers* its
request event or its usage event: statuses carry, per requests-topic partition, the highest offset of a request
event whose reserve they count (``BudgetStatus.covers``), and per usage-topic partition that of a usage event
whose settle they count (``covers_usage``: a settle may reach the ledger before its reserve). Enrich keeps each
partition's order, so every earlier event of that partition is counted too. No fixed grace: nothing is counted
twice, and once traffic stops nothing stays counted past the status that includes it. An admission whose events
never reached the broker (or whose positions nobody gave) is forgotten after ``VIEW__ADMIT_MAX_AGE_S``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Admission", "Admissions", "Covers"]


@dataclass(slots=True, eq=False)
class Admission:
    """Cloud spend a router let through, on its budgets (``global`` included), in the month it was admitted.

    ``source`` is its request event's (partition, offset) on the requests topic, once the broker has it;
    ``usage_source`` its usage event's on the usage topic.
    """

    at: float
    amount: int
    period: str
    budgets: tuple[str, ...]
    source: tuple[int, int] | None = None
    usage_source: tuple[int, int] | None = None

    def covered_by(self, covers: Covers) -> bool:
        """A status with these ``covers`` (of requests, of usage) counts this admission's request or usage event."""
        return _within(self.source, covers[0]) or _within(self.usage_source, covers[1])


Covers = tuple[Mapping[int, int], Mapping[int, int]]  # a status's covers and covers_usage


def _within(position: tuple[int, int] | None, covers: Mapping[int, int]) -> bool:
    return position is not None and covers.get(position[0], -1) >= position[1]


class Admissions:
    """A router's admissions per budget; ``covers_of`` gives what the latest status of a budget covers."""

    def __init__(self, max_age_s: float, covers_of: Callable[[str], Covers | None]) -> None:
        self.max_age_s = max_age_s
        self._covers_of = covers_of
        self._by_budget: dict[str, list[Admission]] = {}

    def __contains__(self, budget: str) -> bool:
        return budget in self._by_budget

    def add(self, admission: Admission) -> None:
        horizon = admission.at - self.max_age_s
        for budget in admission.budgets:
            kept = [a for a in self._by_budget.get(budget, ()) if a.at > horizon]
            kept.append(admission)
            self._by_budget[budget] = kept

    def follow(self, admission: Admission, delivery: asyncio.Future[tuple[int, int] | None], *, usage: bool) -> None:
        """Learn where the admission's request (or ``usage``) event went when the broker acknowledges it.

        The future may belong to another thread's loop (the blocking publisher runs its own): the answer is then
        handed to this thread's loop, so the admissions are only ever changed from one thread.
        """
        try:
            home: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            home = None

        def delivered(done: asyncio.Future[tuple[int, int] | None]) -> None:
            if done.cancelled() or done.exception() is not None or (position := done.result()) is None:
                return
            if home is None or home is done.get_loop():
                self.placed(admission, position, usage=usage)
            else:
                home.call_soon_threadsafe(functools.partial(self.placed, admission, position, usage=usage))

        delivery.add_done_callback(delivered)

    def placed(self, admission: Admission, position: tuple[int, int], *, usage: bool = False) -> None:
        """The admission's request (or ``usage``) event is at ``position``: a status that already covers it ends
        its count."""
        if usage:
            admission.usage_source = position
        else:
            admission.source = position
        for budget in admission.budgets:
            covers = self._covers_of(budget)
            admitted = self._by_budget.get(budget)
            if covers is not None and admitted and admission.covered_by(covers):
                self._by_budget[budget] = [a for a in admitted if a is not admission]

    def status_arrived(self, budget: str, covers: Covers) -> None:
        """A status of ``budget`` arrived: what it counts is no longer this router's to count."""
        admitted = self._by_budget.get(budget)
        if admitted:
            self._by_budget[budget] = [a for a in admitted if not a.covered_by(covers)]

    def pending(self, budget: str, period: str, now: float) -> int:
        """Pico-dollars admitted on ``budget`` in ``period`` that no status has counted yet."""
        horizon = now - self.max_age_s
        return sum(a.amount for a in self._by_budget.get(budget, ()) if a.at > horizon and a.period == period)
