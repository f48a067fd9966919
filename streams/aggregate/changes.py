"""A batch's changes to a partition's state, and the order they are written in (the heart of exactly once).

The aggregate writes what :meth:`BatchChanges.drain` returns to the partition's changelog, in that order, through
one idempotent producer, then to the local store, then commits the ledger offsets. The order: period records,
then lease records, then request records (closed before open), then the partition's meta record (``applied``: the
last offset of the batch), then deletions. A crash leaves a prefix of that order durable. If a request or lease
record of the batch is durable, every period record of the batch is too, so on replay a period never needs a
request or lease state that is already past the entry; and if a request record is durable, every lease record
is too, since a reserve whose request record is durable is skipped as replayed, and the lease it used must
already say so; entries up to ``applied`` are skipped outright.
Replaying any suffix of the ledger after a crash therefore leaves the same state (a property test crashes at
every prefix; docs/architecture.md, "Exactly once, and how it is proven").
"""

from __future__ import annotations

from budgetflow.streams.aggregate.records import (
    META_KEY,
    OPEN_PREFIX,
    REQUEST_PREFIX,
    LeaseState,
    PartitionMeta,
    PeriodState,
    RequestKey,
    RequestState,
    lease_key,
    period_key,
    request_key,
)

__all__ = ["BatchChanges", "Changes"]

Changes = list[tuple[bytes, bytes | None]]  # (key, value) in write order; a value of None deletes the key


class BatchChanges:
    """What the current batch changed on a partition, not yet drained."""

    def __init__(self) -> None:
        self.requests: dict[RequestKey, RequestState] = {}  # each request the batch changed: its latest state
        self._periods: dict[tuple[str, str], PeriodState] = {}
        self._closed: dict[RequestKey, RequestState] = {}
        self._opened: dict[RequestKey, RequestState] = {}
        self._unopened: set[RequestKey] = set()  # open before, closed now: their open record goes
        self._fresh: set[RequestKey] = set()  # opened in this batch: no open record of theirs is durable
        self._deletes: dict[bytes, None] = {}
        self._leases: dict[tuple[str, str, str], LeaseState] = {}

    def period(self, state: PeriodState) -> None:
        self._periods[(state.budget, state.period)] = state

    def forget_period(self, budget: str, period: str) -> None:
        """The period is dropped: its record is deleted, not written."""
        self._periods.pop((budget, period), None)
        self._deletes[period_key(budget, period)] = None

    def opened(self, state: RequestState, *, fresh: bool) -> None:
        """A request is open (reserved, neither settled nor expired); ``fresh``: it was not known before."""
        key = state.key
        self.requests[key] = state
        if fresh:
            self._fresh.add(key)
        self._opened[key] = state
        self._closed.pop(key, None)

    def closed(self, state: RequestState, *, was_open: bool) -> None:
        """A request is closed (settled or expired); ``was_open``: an open record of it may be durable."""
        key = state.key
        self.requests[key] = state
        self._closed[key] = state
        self._opened.pop(key, None)
        if was_open:
            self._unopened.add(key)

    def lease(self, state: LeaseState) -> None:
        self._leases[state.key] = state

    def forget_lease(self, key: tuple[str, str, str]) -> None:
        self._leases.pop(key, None)
        self._deletes[lease_key(key)] = None

    def delete(self, key: bytes) -> None:
        self._deletes[key] = None

    def drain(self, meta: PartitionMeta, last_offset: int) -> Changes:
        """The batch's changes in the order that makes a crash safe (the module docstring); ``meta`` moves to
        ``last_offset`` when anything is written."""
        changes: Changes = []
        for period in self._periods.values():
            # Refusals at or before the last durable batch are never replayed again.
            period.refused = [o for o in period.refused if o > meta.applied]
            period.granted_at = [g for g in period.granted_at if g[0] > meta.applied]
            changes.append((period_key(period.budget, period.period), period.encode()))
        for lease_state in self._leases.values():  # before the requests: a reserve replayed uses its lease again
            changes.append((lease_key(lease_state.key), lease_state.encode()))
        for key, state in self._closed.items():
            changes.append((request_key(REQUEST_PREFIX, key), state.encode()))
        for key, state in self._opened.items():
            changes.append((request_key(OPEN_PREFIX, key), state.encode()))
        for key in self._unopened:
            if key not in self._opened and key not in self._fresh:
                changes.append((request_key(OPEN_PREFIX, key), None))
        if changes or last_offset > meta.applied or self._deletes:
            meta.applied = last_offset
            changes.append((META_KEY, meta.encode()))
        changes.extend((key, None) for key in self._deletes)
        self._clear()
        return changes

    def _clear(self) -> None:
        self.requests.clear()
        self._periods.clear()
        self._closed.clear()
        self._opened.clear()
        self._unopened.clear()
        self._fresh.clear()
        self._deletes.clear()
        self._leases.clear()
