"""A router's leases: headroom on leased budgets, granted by the aggregate, spent here in microseconds.

For a leased budget (:attr:`BudgetPolicy.leased`) a router admits cloud spend only against its lease: what the
aggregate granted it in the lease's epoch, less what it admitted in that epoch, until the lease's expiry less a
margin (its reserves must reach the ledger before the aggregate releases the lease). It asks for more on the
lease-asks topic before it runs dry (``VIEW__LEASE_HORIZON_S`` of its recent rate), and a request its lease cannot
cover waits for a grant up to ``VIEW__LEASE_WAIT_MS``, then is refused. Grants come back on the budget-leases
topic (:class:`budgetflow.schemas.events.LeaseGrant`), which the view follows.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaProducer

from budgetflow.schemas.events import LeaseAsk, LeaseGrant, LeaseTag
from budgetflow.schemas.money import PICO_PER_USD
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import Settings
from budgetflow.streams.kafka.clients import client_options

__all__ = ["LeaseBook", "open_lease_book"]


@dataclass(slots=True)
class _Lease:
    """What this router knows of its lease on one budget."""

    period: str = ""
    epoch: int = -1
    granted: int = 0
    expires_at: float = 0.0
    admitted: int = 0  # admitted by this router in this epoch
    asked_at: float = -1e9  # monotonic time of the last ask not yet answered
    pending: int | None = None  # the number of that ask
    asked: int = 0  # what the asks not yet answered asked for (grants add up)
    waiting: int = 0  # what the requests waiting for a grant need
    rate: float = 0.0  # pico-dollars a second, smoothed
    last_take: float | None = None
    dry_until: float = -1e9  # monotonic: an ask was answered with nothing (the cap): refuse at once until then
    granted_event: asyncio.Event = field(default_factory=asyncio.Event)

    def remaining(self, now: float, margin_s: float) -> int:
        return self.granted - self.admitted if now < self.expires_at - margin_s else 0


class LeaseBook:
    """This router's leases, by budget; ``send`` publishes a :class:`LeaseAsk` (on the lease-asks topic)."""

    def __init__(
        self,
        router: str,
        send: Callable[[LeaseAsk], Awaitable[None]],
        *,
        ttl_s: int,
        margin_s: float,
        horizon_s: float,
        wait_ms: float,
        minimum_pico: int,
    ) -> None:
        self.router = router
        self.send = send
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self.horizon_s = horizon_s
        self.wait_s = wait_ms / 1000
        self.minimum_pico = minimum_pico
        self._leases: dict[str, _Lease] = {}
        self._asks = int(time.time() * 1000)  # asks only grow, across restarts of a router with the same id
        self.waits = 0
        self.refusals = 0

    def granted(self, grant: LeaseGrant) -> None:
        """A LeaseGrant of this router arrived (older epochs and asks are ignored)."""
        if grant.router != self.router:
            return
        lease = self._lease(grant.budget_id)
        if (grant.period, grant.epoch) != (lease.period, lease.epoch):
            lease.period, lease.epoch, lease.admitted, lease.granted = grant.period, grant.epoch, 0, 0
        answered = lease.pending is not None and grant.asks >= lease.pending
        if answered and grant.granted_usd <= lease.granted and grant.epoch == lease.epoch:
            lease.dry_until = time.monotonic() + self.wait_s  # asked, and nothing more came: the budget is spent
        lease.granted = grant.granted_usd
        lease.expires_at = grant.expires_at.timestamp()
        if answered:
            lease.asked_at, lease.pending, lease.asked = -1e9, None, 0
        lease.granted_event.set()

    async def take(self, budgets: list[str], amount: int, now: datetime) -> LeaseTag | str:
        """Charge ``amount`` to the lease of each of ``budgets``, asking and waiting for grants as needed: the tag
        for the request event, or the budget whose lease could not cover it in time (refuse the request)."""
        at = now.timestamp()
        leases = [self._lease(budget) for budget in budgets]
        for lease in leases:
            if lease.remaining(at, self.margin_s) < amount:  # not covered: ask, wait, maybe refuse
                refused = await self._wait_for(budgets, amount, now)
                if refused is not None:
                    return refused
                break
        moment = time.monotonic()
        epochs = {}
        for budget, lease in zip(budgets, leases, strict=True):
            lease.admitted += amount
            self._observe(lease, amount, moment)
            epochs[budget] = lease.epoch
            want = self._ask_for(lease, 0, at, moment)
            if want:  # ahead of need: the next grant before this one runs dry
                await self._ask(budget, lease, want, now)
        return LeaseTag(router=self.router, pico=amount, epochs=epochs)

    async def _wait_for(self, budgets: list[str], amount: int, now: datetime) -> str | None:
        """Ask for the leases short of ``amount`` and wait up to the lease wait for grants that cover it: None when
        they came, else the budget to refuse the request for."""
        for budget in budgets:  # asks are sized to what waits, not to one request: a burst is one round trip
            self._lease(budget).waiting += amount
        try:
            return await self._wait(budgets, amount, now)
        finally:
            for budget in budgets:
                self._lease(budget).waiting -= amount

    async def _wait(self, budgets: list[str], amount: int, now: datetime) -> str | None:
        deadline = time.monotonic() + self.wait_s
        at = now.timestamp()
        while True:
            for budget in budgets:  # cleared before looking: a grant from here on wakes the wait below
                self._lease(budget).granted_event.clear()
            short = [b for b in budgets if self._lease(b).remaining(at, self.margin_s) < amount]
            if not short:
                return None
            left = deadline - time.monotonic()
            dry = [b for b in short if self._lease(b).dry_until > time.monotonic()]
            if left <= 0 or dry:  # waiting would not help: nothing was left to grant a moment ago
                self.refusals += 1
                return (dry or short)[0]
            for budget in short:
                lease = self._lease(budget)
                want = self._ask_for(lease, amount, at, time.monotonic())
                if want:
                    await self._ask(budget, lease, want, now)
            self.waits += 1
            waits = [asyncio.ensure_future(self._lease(b).granted_event.wait()) for b in short]
            _, pending = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()

    def _lease(self, budget: str) -> _Lease:
        lease = self._leases.get(budget)
        if lease is None:
            lease = self._leases[budget] = _Lease()
        return lease

    def _observe(self, lease: _Lease, amount: int, now: float) -> None:
        """The router's recent rate on a budget (``now``: monotonic): nothing to go by before its second request."""
        if lease.last_take is not None:
            elapsed = max(now - lease.last_take, 1e-3)
            lease.rate = 0.8 * lease.rate + 0.2 * (amount / elapsed)
        lease.last_take = now

    def _target(self, lease: _Lease) -> int:
        """What to hold: the horizon at the recent rate (at least the least), and twice what the requests waiting
        need (a burst that finds the lease dry is covered in a round trip or two, not a minimum at a time)."""
        return max(self.minimum_pico, int(lease.rate * self.horizon_s), 2 * lease.waiting)

    def _ask_for(self, lease: _Lease, amount: int, at: float, now_m: float) -> int:
        """How much to ask for before charging ``amount`` (0: nothing). Ask when what the lease holds and what is
        asked for does not cover the requests waiting, or will cover less than half the target after this one
        (an ask unanswered for the lease wait is taken as lost); never while the last answer was that the
        budget is spent."""
        if now_m - lease.asked_at >= self.wait_s:
            lease.asked = 0
        if lease.dry_until > now_m:
            return 0
        held = lease.remaining(at, self.margin_s) + lease.asked
        target = self._target(lease)
        if held >= lease.waiting and held - amount >= target // 2:
            return 0
        return max(self.minimum_pico, target - held)

    async def _ask(self, budget: str, lease: _Lease, want: int, now: datetime) -> None:
        lease.asked_at = time.monotonic()
        lease.asked += want
        self._asks += 1
        lease.pending = self._asks
        await self.send(
            LeaseAsk(
                router=self.router,
                budget_id=budget,
                ask=self._asks,
                amount_usd=want,
                occurred_at=now,
                ttl_s=self.ttl_s,
            )
        )


async def open_lease_book(settings: Settings, topic: str) -> tuple[LeaseBook, Callable[[], Awaitable[None]]]:
    """A started lease book for a view, with the producer its asks go out on; and how to stop it."""
    view = settings.view
    producer = AIOKafkaProducer(**client_options(settings.kafka), enable_idempotence=True, acks="all", linger_ms=0)
    await producer.start()

    async def send(ask: LeaseAsk) -> None:
        await producer.send(topic, key=ask.budget_id.encode(), value=dumps(ask))

    router = view.router_id or f"{socket.gethostname()[:64]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    book = LeaseBook(
        "".join(c if c.isalnum() or c in "._:-" else "-" for c in router),
        send,
        ttl_s=view.lease_ttl_s,
        margin_s=view.lease_margin_s,
        horizon_s=view.lease_horizon_s,
        wait_ms=view.lease_wait_ms,
        minimum_pico=int(view.lease_min_usd * PICO_PER_USD),
    )
    return book, producer.stop
