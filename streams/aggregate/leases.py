"""Budget leases on one ledger partition: headroom granted to routers, drawn on by their reserves, released.

A router admits cloud spend on a leased budget (:attr:`BudgetPolicy.leased`) only against headroom the aggregate
granted it. It asks with a ``lease`` entry on the budget's ledger partition, so the ask is ordered with the
budget's reserves and settles; the grant is decided here, from the period's exact sums:

    available = limit - settled - reserved - leased (what every router holds and has not used)

and a router gets at most its fair share of what is left among the routers holding some, so the last dollars are
not stranded in one router. A reserve admitted under a lease names the router, the lease's epoch and what the
router charged to it: that much moves from the lease to the reservation, so nothing is held twice. A lease not
renewed by its expiry (stream time) is released at the next expiring tick: what it still holds returns to the
budget and its epoch moves on. So at every grant settled + reserved + leased <= limit, and a router that dies
holds nothing after its lease's TTL (docs/architecture.md, "Leases").

Exactly once as for requests (:mod:`budgetflow.streams.aggregate.ledger`): every lease record remembers the last
ledger offset it reflects; the period record is written first and remembers what each lease entry of the batch
was granted (``granted_at``), so a replay onto a durable period grants the same again.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import replace

from budgetflow.schemas.events import LedgerEntry
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.streams.aggregate.changes import BatchChanges
from budgetflow.streams.aggregate.records import LEASE_PREFIX, LeaseState, PeriodState, decode_key
from budgetflow.streams.aggregate.store import Store

__all__ = ["PartitionLeases"]

LeaseKey = tuple[str, str, str]  # (budget, period, router)


class PartitionLeases:
    """The leases of one partition: ``ask`` on lease entries, ``use`` on reserves, ``release`` on ticks."""

    def __init__(self, store: Store, changes: BatchChanges, policy_for: Callable[[str], BudgetPolicy]) -> None:
        self.store = store
        self.changes = changes
        self.policy_for = policy_for
        self.leases: dict[LeaseKey, LeaseState] = {}
        self._routers: dict[tuple[str, str], set[str]] = {}  # the routers with a lease on each (budget, period)
        self._expiry: list[tuple[float, LeaseKey]] = []
        self.changed: dict[LeaseKey, LeaseState] = {}  # since the last take_changed (for publishing grants)

    def load(self) -> None:
        self.leases, self._routers = {}, {}
        for key, value in self.store.scan(LEASE_PREFIX):
            _, (budget, period, router) = decode_key(key)
            lease = LeaseState.decode((budget, period, router), value)
            self.leases[lease.key] = lease
            self._routers.setdefault((budget, period), set()).add(router)
        self._expiry = [(lease.expires_at, key) for key, lease in self.leases.items() if lease.outstanding]
        heapq.heapify(self._expiry)

    def take_changed(self) -> list[LeaseState]:
        out = list(self.changed.values())
        self.changed.clear()
        return out

    def holders(self, budget: str, period: str) -> list[LeaseState]:
        """The leases on a budget's month (an ask looks them up: indexed, not a scan of the partition's leases)."""
        return [self.leases[(budget, period, router)] for router in self._routers.get((budget, period), ())]

    # -- the three things that change a lease ------------------------------------------------------------------
    def ask(
        self, entry: LedgerEntry, offset: int, period_of: Callable[[str, str], PeriodState]
    ) -> tuple[bool, PeriodState | None]:
        """A router asks for ``amount`` more on the entry's budget: grant what the rule allows. Whether it was
        answered now (not: replayed, or an ask already answered), and the period record it changed now."""
        assert entry.budget_id is not None
        key = (entry.budget_id, entry.period, entry.request_id)
        lease = self.leases.get(key) or LeaseState(*key)
        if lease.ledger_offset >= offset or entry.attempt <= lease.asks:
            return False, None
        period = period_of(entry.budget_id, entry.period)
        changed: PeriodState | None = None
        if period.ledger_offset >= offset:
            grant = period.granted_by(offset) or 0  # the period is durable past this entry: grant it again
        else:
            changed = period
            grant = self._grant(period, lease, entry.amount_pico_usd)
            period.leased += grant
            period.granted_at.append([offset, grant])
            period.ledger_offset = offset
            self.changes.period(period)
        expires = max(lease.expires_at, entry.occurred_at.timestamp() + (entry.ttl_s or 0))
        self._put(replace(lease, granted=lease.granted + grant, expires_at=expires, asks=entry.attempt), offset)
        return True, changed

    def use(self, entry: LedgerEntry, offset: int, period: PeriodState, *, period_durable: bool) -> None:
        """A reserve admitted under a lease reached the ledger: what the router charged moves off the lease."""
        if entry.lease_router is None or entry.lease_pico is None or entry.budget_id is None:
            return
        lease = self.leases.get((entry.budget_id, entry.period, entry.lease_router))
        if lease is None or lease.ledger_offset >= offset or lease.epoch != entry.lease_epoch:
            return  # unknown, replayed, or released since: the reserve counts as any other
        used = min(entry.lease_pico, lease.outstanding)
        if not used:
            return
        if not period_durable:
            period.leased -= used
            self.changes.period(period)
        self._put(replace(lease, used=lease.used + used), offset)

    def release(
        self, now: float, offset: int, period_of: Callable[[str, str], PeriodState], live: set[tuple[str, str]]
    ) -> None:
        """At an expiring tick: leases past their expiry return what they hold, and their epoch moves on.
        ``live``: the periods this tick changed just now (as opposed to: already reflect it, a replay)."""
        deferred: list[tuple[float, LeaseKey]] = []
        while self._expiry and self._expiry[0][0] <= now:
            item = heapq.heappop(self._expiry)
            lease = self.leases.get(item[1])
            if lease is None or lease.expires_at > now or not lease.outstanding:
                continue  # renewed, used up, or a stale heap entry
            if lease.ledger_offset >= offset:
                deferred.append(item)  # a replay: this lease is already past the tick
                continue
            period = period_of(lease.budget, lease.period)
            pkey = (lease.budget, lease.period)
            if period.ledger_offset < offset or pkey in live:
                live.add(pkey)
                period.leased -= lease.outstanding
                period.ledger_offset = offset
                self.changes.period(period)
            self._put(replace(lease, epoch=lease.epoch + 1, granted=0, used=0), offset)
        for item in deferred:
            heapq.heappush(self._expiry, item)

    def forget_period(self, budget: str, period: str) -> None:
        for router in self._routers.pop((budget, period), set()):
            del self.leases[(budget, period, router)]
            self.changes.forget_lease((budget, period, router))

    # -- internals --------------------------------------------------------------------------------------------
    def _grant(self, period: PeriodState, lease: LeaseState, asked: int) -> int:
        """min(asked, available, the fair share): every holder may hold an equal part of what is not spent."""
        limit = self.policy_for(period.budget).monthly_limit_usd
        if limit is None:
            return asked
        available = limit - period.settled - period.reserved - period.leased
        if available <= 0:
            return 0
        holders = {h.router for h in self.holders(period.budget, period.period) if h.outstanding}
        holders.add(lease.router)
        share = (available + period.leased) // len(holders) - lease.outstanding
        return max(0, min(asked, available, share))

    def _put(self, lease: LeaseState, offset: int) -> None:
        lease = replace(lease, ledger_offset=offset)
        self.leases[lease.key] = lease
        self._routers.setdefault((lease.budget, lease.period), set()).add(lease.router)
        self.changed[lease.key] = lease
        self.changes.lease(lease)
        if lease.outstanding:
            heapq.heappush(self._expiry, (lease.expires_at, lease.key))
