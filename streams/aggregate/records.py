"""The ledger's persisted records and their keys: what a partition's changelog and its local store hold.

Three kinds of record, each a JSON array (positional: a field's name is never written, so renaming a field
changes nothing persisted; adding one means appending it, and decoding what was written before it):

* ``p|budget<US>period``: a :class:`PeriodState`, one budget's month;
* ``r|budget<US>request<US>attempt`` (closed) and ``o|...`` (open, a reservation in flight): a
  :class:`RequestState`;
* ``l|budget<US>period<US>router``: a :class:`LeaseState`, one router's lease on one budget's month;
* ``m|``: the partition's :class:`PartitionMeta`.

Every period and request record carries ``ledger_offset``: the offset of the last ledger entry it reflects, which
is what makes replaying an entry idempotent (:mod:`budgetflow.streams.aggregate.ledger`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from budgetflow.schemas.events import ShardSum, StatusName
from budgetflow.schemas.serde import dumps, loads

__all__ = [
    "LEASE_PREFIX",
    "META_KEY",
    "OPEN_PREFIX",
    "PERIOD_PREFIX",
    "REQUEST_PREFIX",
    "LeaseState",
    "PartitionMeta",
    "PeriodState",
    "RequestKey",
    "RequestState",
    "decode_key",
    "lease_key",
    "period_key",
    "request_key",
]

PERIOD_PREFIX = b"p|"
LEASE_PREFIX = b"l|"
OPEN_PREFIX = b"o|"
REQUEST_PREFIX = b"r|"
META_KEY = b"m|"
SEP = b"\x1f"  # neither budget ids nor request ids may contain control characters

_INT64 = 1 << 63

RequestKey = tuple[str, str, int]  # (budget, request id, attempt)


def _wide(value: int) -> int | str:
    """An amount for the state's JSON: orjson encodes 64 bits, a period's sums may be larger (MAX_PERIOD_PICO)."""
    return value if -_INT64 < value < _INT64 else str(value)


@dataclass(slots=True)
class PeriodState:
    """One budget's month: exact sums, counts, and the status state machine."""

    budget: str
    period: str
    settled: int = 0
    reserved: int = 0
    requests: int = 0
    settles: int = 0
    expired: int = 0
    adjusted: int = 0
    unpriced: int = 0
    status: StatusName = "normal"
    events: list[str] = field(default_factory=list)
    ledger_offset: int = -1  # the last ledger entry this record reflects
    # Offsets of entries refused as out_of_range since the partition's last durable batch: a replay after a
    # crash must refuse them again even when this record (written first) is durable and its sums are past them.
    refused: list[int] = field(default_factory=list)
    # Per requests-topic partition, the highest offset of a request event whose reserve reached this record, and
    # per usage-topic partition that of a settle's usage event (BudgetStatus.covers, covers_usage): they only
    # grow, so replaying an entry never changes them.
    covers: dict[int, int] = field(default_factory=dict)
    covers_usage: dict[int, int] = field(default_factory=dict)
    # Headroom granted to routers and not yet used by their reserves nor released (the sum of the leases'
    # outstanding), and what each lease entry since the partition's last durable batch was granted (offset,
    # amount): a replay onto this record, durable first, must grant the same again.
    leased: int = 0
    granted_at: list[list[int]] = field(default_factory=list)
    # A sharded budget's home record: each shard's latest sums (:mod:`budgetflow.streams.aggregate.shardsums`).
    shards: dict[int, ShardSum] = field(default_factory=dict)

    @property
    def spend(self) -> int:
        return self.settled + self.reserved

    def granted_by(self, offset: int) -> int | None:
        """What the lease entry at ``offset`` was granted, if this record reflects it."""
        return next((amount for at, amount in self.granted_at if at == offset), None)

    def encode(self) -> bytes:
        later: list[object] = [
            sorted(self.covers.items()),
            sorted(self.covers_usage.items()),
            _wide(self.leased),
            self.granted_at,
            [part.model_dump(mode="json") for _, part in sorted(self.shards.items())],
        ]
        while later and not later[-1]:  # trailing fields at their defaults: written as the code before them
            later.pop()
        return dumps(
            [
                _wide(self.settled),
                _wide(self.reserved),
                self.requests,
                self.settles,
                self.expired,
                self.adjusted,
                self.unpriced,
                self.status,
                self.events,
                self.ledger_offset,
                self.refused,
                *later,
            ]
        )

    @classmethod
    def decode(cls, budget: str, period: str, raw: bytes) -> PeriodState:
        # Records written before refusals (or covers) were kept lack them.
        s, r, n, st, ex, ad, un, status, events, offset, *later = loads(raw)
        refused = later[0] if later else []
        covers = {int(p): int(o) for p, o in later[1]} if len(later) > 1 else {}
        covers_usage = {int(p): int(o) for p, o in later[2]} if len(later) > 2 else {}
        leased = int(later[3]) if len(later) > 3 else 0
        granted_at = [list(pair) for pair in later[4]] if len(later) > 4 else []
        shards = [ShardSum.model_validate(part) for part in later[5]] if len(later) > 5 else []
        return cls(
            budget,
            period,
            int(s),
            int(r),
            n,
            st,
            ex,
            ad,
            un,
            status,
            list(events),
            offset,
            list(refused),
            covers,
            covers_usage,
            leased,
            granted_at,
            {part.shard: part for part in shards},
        )


@dataclass(slots=True)
class RequestState:
    """One (budget, request, attempt): its estimate, its actual, and what it contributes."""

    budget: str
    request_id: str
    attempt: int
    period: str
    req_at: float
    ttl_s: int
    est: int | None = None
    act: int | None = None
    expired: bool = False
    manual: bool = False
    ledger_offset: int = -1  # the last ledger entry this record reflects

    @property
    def key(self) -> RequestKey:
        return (self.budget, self.request_id, self.attempt)

    @property
    def is_open(self) -> bool:
        return self.est is not None and self.act is None and not self.expired

    @property
    def settled_part(self) -> int:
        if self.act is not None:
            return self.act
        if self.expired and self.est is not None:
            return self.est
        return 0

    @property
    def reserved_part(self) -> int:
        return self.est if self.is_open and self.est is not None else 0

    def changed(self, **changes: object) -> RequestState:
        """A copy with ``changes``."""
        copy = RequestState(
            self.budget,
            self.request_id,
            self.attempt,
            self.period,
            self.req_at,
            self.ttl_s,
            self.est,
            self.act,
            self.expired,
            self.manual,
            self.ledger_offset,
        )
        for name, value in changes.items():
            setattr(copy, name, value)
        return copy

    def encode(self) -> bytes:
        return dumps(
            [self.period, self.req_at, self.ttl_s, self.est, self.act, self.expired, self.manual, self.ledger_offset]
        )

    @classmethod
    def decode(cls, key: RequestKey, raw: bytes) -> RequestState:
        period, req_at, ttl, est, act, expired, manual, offset = loads(raw)
        return cls(key[0], key[1], key[2], period, req_at, ttl, est, act, expired, manual, offset)


@dataclass(slots=True)
class LeaseState:
    """One router's lease on one budget's month: what it was granted and what its reserves used, in its epoch.

    A lease not renewed by ``expires_at`` (stream time) is released: what it still holds returns to the budget,
    and its epoch moves on, so reserves admitted under the old epoch no longer draw on it.
    """

    budget: str
    period: str
    router: str
    epoch: int = 0
    granted: int = 0
    used: int = 0
    expires_at: float = 0.0
    asks: int = -1  # the last ask applied (a lease entry's attempt)
    ledger_offset: int = -1  # the last ledger entry this record reflects

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.budget, self.period, self.router)

    @property
    def outstanding(self) -> int:
        return max(0, self.granted - self.used)

    def encode(self) -> bytes:
        return dumps(
            [self.epoch, _wide(self.granted), _wide(self.used), self.expires_at, self.asks, self.ledger_offset]
        )

    @classmethod
    def decode(cls, key: tuple[str, str, str], raw: bytes) -> LeaseState:
        epoch, granted, used, expires_at, asks, offset = loads(raw)
        return cls(key[0], key[1], key[2], epoch, int(granted), int(used), expires_at, asks, offset)


@dataclass(slots=True)
class PartitionMeta:
    """The partition's own record: the last ledger offset its durable state reflects, its stream time, its month."""

    applied: int = -1
    stream_time: float = 0.0
    period: str | None = None

    def encode(self) -> bytes:
        return dumps([self.applied, self.stream_time, self.period])

    @classmethod
    def decode(cls, raw: bytes) -> PartitionMeta:
        applied, stream_time, period = loads(raw)
        return cls(applied, stream_time, period)


def request_key(prefix: bytes, key: RequestKey) -> bytes:
    """The store key of a request record: ``prefix`` is :data:`REQUEST_PREFIX` (closed) or :data:`OPEN_PREFIX`."""
    return prefix + key[0].encode() + SEP + key[1].encode() + SEP + str(key[2]).encode()


def period_key(budget: str, period: str) -> bytes:
    return PERIOD_PREFIX + budget.encode() + SEP + period.encode()


def lease_key(key: tuple[str, str, str]) -> bytes:
    return LEASE_PREFIX + key[0].encode() + SEP + key[1].encode() + SEP + key[2].encode()


def decode_key(raw: bytes) -> tuple[str, tuple[str, ...]]:
    """(kind, parts) of a state key: ``('p', (budget, period))``, ``('r', (budget, request, attempt))``, ..."""
    kind = raw[:1].decode()
    if raw == META_KEY:
        return "m", ()
    return kind, tuple(part.decode() for part in raw[2:].split(SEP))
