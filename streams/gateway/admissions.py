"""What one router let through to cloud models, counted until the pipeline's statuses count it.

Between two statuses of a budget, a router adds the cloud spend it admitted to the last status it read, so that
it alone cannot overrun what remains. An admission stops counting when a status of its budget and month *covers*
its request event or its usage event: statuses carry, per requests-topic partition, the highest offset of a
request event whose reserve they count (``BudgetStatus.covers``), and per usage-topic partition that of a usage
event whose settle they count (``covers_usage``: a settle may reach the ledger before its reserve). Enrich keeps
each partition's order, so every earlier event of that partition is counted too. No fixed grace: nothing is
counted twice, and once traffic stops nothing stays counted past the status that includes it.

An admission whose events never reached the broker is forgotten after ``VIEW__ADMIT_MAX_AGE_S``. One admitted
without saying where its request event went (``view.admit`` without ``request=`` or ``source=``, ``/v1/admit``
without a position) cannot be matched: it counts until a status ``VIEW__ADMIT_GRACE_S`` newer than it arrives.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING

from budgetflow.schemas.periods import period_of
from budgetflow.streams.rules.scopes import BudgetResolver, with_global

if TYPE_CHECKING:
    from budgetflow.streams.gateway.publisher import RequestHandle

__all__ = ["NO_COVERS", "Admission", "Admissions", "Covers", "Seen", "charged_budgets", "covers_of"]


@dataclass(slots=True, eq=False)
class Admission:
    """Cloud spend a router let through, on its budgets (``global`` included), in the month it was admitted.

    ``source`` is its request event's (partition, offset) on the requests topic, once the broker has it;
    ``usage_source`` its usage event's on the usage topic; ``placed``: its positions are (or will be) known.
    """

    at: float
    amount: int
    period: str
    budgets: tuple[str, ...]
    placed: bool = True
    source: tuple[int, int] | None = None
    usage_source: tuple[int, int] | None = None

    def covered_by(self, covers: Covers) -> bool:
        """A status with these ``covers`` (of requests, of usage) counts this admission's request or usage event."""
        return _within(self.source, covers[0]) or _within(self.usage_source, covers[1])


Covers = tuple[Mapping[int, int], Mapping[int, int]]  # a status's covers and covers_usage
NO_COVERS: Covers = (MappingProxyType({}), MappingProxyType({}))


def covers_of(covers: Mapping[int, int], covers_usage: Mapping[int, int]) -> Covers:
    """A status's covers as a view keeps them: one shared, read-only pair when it says none."""
    return (covers, covers_usage) if covers or covers_usage else NO_COVERS


@dataclass(frozen=True, slots=True)
class Seen:
    """What the latest status of a budget says: its month, when it was taken, and the events it covers."""

    period: str
    as_of: float
    covers: Covers

    def counts(self, admission: Admission, grace_s: float) -> bool:
        """This status counts the admission (one without positions: it is ``grace_s`` newer)."""
        if admission.period != self.period:
            return False
        if not admission.placed:
            return admission.at + grace_s <= self.as_of
        return admission.covered_by(self.covers)


def _within(position: tuple[int, int] | None, covers: Mapping[int, int]) -> bool:
    return position is not None and covers.get(position[0], -1) >= position[1]


class Admissions:
    """A router's admissions per budget; ``covers_of`` gives what the latest status of a budget covers."""

    def __init__(self, max_age_s: float, grace_s: float, seen: Callable[[str], Seen | None]) -> None:
        self.max_age_s = max_age_s
        self.grace_s = grace_s
        self._seen = seen
        self._by_budget: dict[str, list[Admission]] = {}

    def __contains__(self, budget: str) -> bool:
        return budget in self._by_budget

    def admit(
        self,
        moment: datetime,
        amount: int,
        budgets: tuple[str, ...],
        *,
        request: RequestHandle | None,
        source: tuple[int, int] | None,
    ) -> Admission:
        """Count ``amount`` on ``budgets`` from ``moment``, following the request's events where they go."""
        period = period_of(request.occurred_at if request is not None else moment)
        placed = source is not None or (request is not None and request.delivery is not None)
        admission = Admission(moment.timestamp(), amount, period, budgets, placed)
        self.add(admission)
        if source is not None:
            self.placed(admission, source)
        elif request is not None and request.delivery is not None:
            self.follow(admission, request.delivery, usage=False)
        if request is not None and request.usage_delivery is not None:
            self.follow(admission, request.usage_delivery, usage=True)
        return admission

    def add(self, admission: Admission) -> None:
        horizon = admission.at - self.max_age_s
        for budget in admission.budgets:
            kept = [a for a in self._by_budget.get(budget, ()) if a.at > horizon]
            kept.append(admission)
            self._by_budget[budget] = kept

    def follow(self, admission: Admission, delivery: asyncio.Future[tuple[int, int] | None], *, usage: bool) -> None:
        """Learn where the admission's request (or ``usage``) event went when the broker acknowledges it.

        The future may belong to another thread's loop (the blocking publisher runs its own): the callback is
        added on that loop, and the answer handed back to this thread's loop, so the admissions only ever change
        on one thread. Without a running loop here the position is not followed (the admission counts until
        ``max_age_s``).
        """
        try:
            home = asyncio.get_running_loop()
        except RuntimeError:
            return
        other = delivery.get_loop()

        def delivered(done: asyncio.Future[tuple[int, int] | None]) -> None:
            if done.cancelled() or done.exception() is not None or (position := done.result()) is None:
                return
            if home is other:
                self.placed(admission, position, usage=usage)
            else:
                home.call_soon_threadsafe(functools.partial(self.placed, admission, position, usage=usage))

        if home is other:
            delivery.add_done_callback(delivered)
        else:
            other.call_soon_threadsafe(delivery.add_done_callback, delivered)

    def placed(self, admission: Admission, position: tuple[int, int], *, usage: bool = False) -> None:
        """The admission's request (or ``usage``) event is at ``position``: a status that already covers it ends
        its count."""
        admission.placed = True
        if usage:
            admission.usage_source = position
        else:
            admission.source = position
        for budget in admission.budgets:
            seen = self._seen(budget)
            admitted = self._by_budget.get(budget)
            if seen is not None and admitted and seen.counts(admission, self.grace_s):
                self._by_budget[budget] = [a for a in admitted if a is not admission]

    def status_arrived(self, budget: str, seen: Seen) -> None:
        """A status of ``budget`` arrived: what it counts is no longer this router's to count."""
        admitted = self._by_budget.get(budget)
        if admitted:
            self._by_budget[budget] = [a for a in admitted if not seen.counts(a, self.grace_s)]

    def pending(self, budget: str, period: str, now: float) -> int:
        """Pico-dollars admitted on ``budget`` in ``period`` that no status has counted yet."""
        horizon = now - self.max_age_s
        return sum(a.amount for a in self._by_budget.get(budget, ()) if a.at > horizon and a.period == period)


def charged_budgets(
    resolver: BudgetResolver | None, budgets: Sequence[str], request: RequestHandle | None
) -> tuple[str, ...]:
    """The budgets an admission counts on: those named, and with the policies followed, their parents and the
    scoped budgets the request matches (as ``decide`` holds it to them), ``global`` always."""
    if resolver is None:
        return tuple(with_global(budgets))
    if request is None:  # parents only: no scope can match what is not said
        return tuple(resolver.resolve(budgets, model="", provider="", backend="cloud", metadata={}))
    return tuple(
        resolver.resolve(
            budgets,
            model=request.model,
            provider=request.provider,
            backend=request.backend,
            metadata=dict(request.metadata),
        )
    )
