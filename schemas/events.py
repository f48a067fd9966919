"""The wire events: what gateways publish, what the pipeline writes, what routers read.

Field names are a contract with other programs (docs/architecture.md, "Topics and keys"). Every event
carries ``"v": 1``; events ignore unknown fields (the decoder counts them);
USD amounts are exact decimal strings on the wire and int pico-dollars here.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    field_validator,
    model_validator,
)

from budgetflow.schemas.money import MAX_ENTRY_PICO, MAX_PERIOD_PICO, NonNegativeUsdAmount, PicoUsd
from budgetflow.schemas.periods import period_of

__all__ = [
    "BUDGET_ID_PATTERN",
    "GLOBAL_BUDGET",
    "MAX_SHARDS",
    "MAX_TOKENS",
    "SHARD_MARK",
    "Backend",
    "BudgetId",
    "BudgetStatus",
    "ChatMessage",
    "EntryKind",
    "Event",
    "HardLimitAction",
    "Heartbeat",
    "LeaseAsk",
    "LeaseGrant",
    "LeaseTag",
    "LedgerAccount",
    "LedgerEntry",
    "Metadata",
    "MetadataKey",
    "Outcome",
    "RequestEvent",
    "ShardSum",
    "StatusName",
    "StatusReason",
    "Tier",
    "UsageEvent",
    "entry_id",
    "period_of",
]

BUDGET_ID_PATTERN = r"^[a-z0-9][a-z0-9:._-]{0,127}$"
GLOBAL_BUDGET = "global"
# No single call uses a billion tokens; anything larger is a bug or an attack.
MAX_TOKENS = 10**9
_MIN_YEAR, _MAX_YEAR = 2000, 2999

BudgetId = Annotated[str, StringConstraints(pattern=BUDGET_ID_PATTERN)]
# A ledger account: a budget, or one shard of a sharded budget (``budget#k``; ``#`` is never in a budget id).
SHARD_MARK = "#"
MAX_SHARDS = 64
LedgerAccount = Annotated[str, StringConstraints(pattern=BUDGET_ID_PATTERN[:-1] + r"(#[0-9]{1,2})?$")]
MetadataKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
Metadata = Annotated[dict[MetadataKey, Annotated[str, StringConstraints(max_length=256)]], Field(max_length=32)]
"""Gateway-supplied labels of a request (team, project, ...): what budget scopes match on. Never prompt text."""
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$")]
LeaseRouter = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS, strict=True)]
Backend = Literal["cloud", "local"]
Outcome = Literal["completed", "failed", "cancelled"]
Tier = Literal["exact", "approximate", "heuristic", "reported"]
EntryKind = Literal["reserve", "settle", "tick", "adjust", "lease", "partial"]
StatusName = Literal["normal", "soft_limit", "hard_limit"]
StatusReason = Literal["threshold", "step", "refresh", "rollover", "policy"]
HardLimitAction = Literal["warn", "block_cloud", "block_all"]
_PERIOD = re.compile(r"^2\d{3}-(0[1-9]|1[0-2])$")  # the years a Timestamp may have


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("must be an RFC 3339 time with an offset (e.g. 2026-11-29T12:00:00Z)")
    if not _MIN_YEAR <= value.year <= _MAX_YEAR:
        raise ValueError(f"year must be between {_MIN_YEAR} and {_MAX_YEAR}")
    return value.astimezone(UTC)


Timestamp = Annotated[datetime, AfterValidator(_utc)]


def entry_id(request_id: str, attempt: int, kind: str, budget_id: str) -> str:
    """The deterministic id of a ledger entry: ``request_id:attempt:kind:budget_id``."""
    return f"{request_id}:{attempt}:{kind}:{budget_id}"


class Event(BaseModel):
    """Base of the wire events: version 1, unknown fields ignored, immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1

    @field_validator("v", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("v must be the integer 1")
        if value != 1:
            raise ValueError(f"version {value} is not supported (this reader knows v=1)")
        return value


def _unique_budgets(value: list[str]) -> list[str]:
    seen: dict[str, None] = dict.fromkeys(value)
    return list(seen)


class ChatMessage(BaseModel):
    """One message in OpenAI's chat shape; content is a string or a list of parts."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    content: str | list[dict[str, Any]] | None = None
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class LeaseTag(BaseModel):
    """What a router charged to its leases for a request: its id, the amount, and each leased budget's epoch."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    router: LeaseRouter
    pico: Annotated[int, Field(ge=0, le=MAX_ENTRY_PICO, strict=True)]
    epochs: Annotated[dict[BudgetId, Annotated[int, Field(ge=0, strict=True)]], Field(max_length=64)]


class RequestEvent(Event):
    """A gateway's record of one billed call to a model, published when it is sent."""

    request_id: RequestId
    attempt: Annotated[int, Field(ge=0, le=10_000, strict=True)] = 0
    occurred_at: Timestamp
    budgets: Annotated[list[BudgetId], Field(max_length=64), AfterValidator(_unique_budgets)] = []
    model: Name
    provider: Name
    backend: Backend
    session_id: Annotated[str, StringConstraints(max_length=256)] | None = None
    metadata: Metadata = {}
    messages: Annotated[list[ChatMessage], Field(max_length=100_000)] | None = None
    prompt: str | None = None
    tools: list[dict[str, Any]] | None = None
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    n: Annotated[int, Field(ge=1, le=128, strict=True)] | None = None
    # Bounded like token counts: the byte heuristic turns at most MAX_TOKENS bytes into fewer than MAX_TOKENS
    # tokens, so a request accepted here always makes a valid reserve entry.
    input_bytes: Annotated[int, Field(ge=0, le=MAX_TOKENS, strict=True)] | None = None
    # Admitted under leases: the reserves of these budgets draw the router's charge off its leases.
    lease: LeaseTag | None = None

    @model_validator(mode="after")
    def _one_input(self) -> RequestEvent:
        given = [name for name in ("messages", "prompt", "input_bytes") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of messages, prompt or input_bytes must be given")
        return self

    @property
    def period(self) -> str:
        return period_of(self.occurred_at)


class UsageEvent(Event):
    """What a call used, normalised to one rule whatever the provider.

    ``input_tokens`` counts every prompt token, cache reads and writes
    included; ``output_tokens`` every generated token, reasoning included.
    """

    request_id: RequestId
    attempt: Annotated[int, Field(ge=0, le=10_000, strict=True)] = 0
    request_occurred_at: Timestamp
    occurred_at: Timestamp
    budgets: Annotated[list[BudgetId], Field(max_length=64), AfterValidator(_unique_budgets)] = []
    model: Name
    provider: Name
    backend: Backend
    metadata: Metadata = {}
    # The request's model when the provider reported another one (an alias resolved, a fallback): budget scopes
    # match on the request's model, so a reserve and its settle are charged to the same budgets.
    request_model: Name | None = None
    # What the provider billed, where it says (OpenRouter, some gateways): the cost when PRICING__TRUST_REPORTED_COST
    # names the provider; else ignored.
    reported_cost_usd: NonNegativeUsdAmount | None = None
    outcome: Outcome
    input_tokens: Tokens
    cached_input_tokens: Tokens = 0
    cache_write_input_tokens: Tokens = 0
    output_tokens: Tokens
    reasoning_tokens: Tokens = 0

    @model_validator(mode="after")
    def _usage_rule(self) -> UsageEvent:
        if self.cached_input_tokens + self.cache_write_input_tokens > self.input_tokens:
            raise ValueError("usage rule: cached_input_tokens + cache_write_input_tokens must not exceed input_tokens")
        if self.reasoning_tokens > self.output_tokens:
            raise ValueError("usage rule: reasoning_tokens must not exceed output_tokens")
        return self

    @property
    def period(self) -> str:
        return period_of(self.request_occurred_at)


# A month's sum of pico-dollars, as a decimal string on the wire (it may pass 64 bits: MAX_PERIOD_PICO).
_PeriodSum = Annotated[
    int, Field(ge=-MAX_PERIOD_PICO, le=MAX_PERIOD_PICO), PlainSerializer(str, return_type=str, when_used="json")
]


class ShardSum(BaseModel):
    """One shard's sums of a sharded budget's month, as the worker that owns the shard has them: what a
    ``partial`` entry carries to the budget's home partition. ``version`` (the shard's last ledger offset that
    changed them) only grows, so the home keeps the highest and a replayed or reordered partial changes nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shard: Annotated[int, Field(ge=0, lt=MAX_SHARDS, strict=True)]
    version: Annotated[int, Field(ge=0, strict=True)]
    settled: _PeriodSum
    reserved: _PeriodSum
    requests: Annotated[int, Field(ge=0, strict=True)] = 0
    settles: Annotated[int, Field(ge=0, strict=True)] = 0
    covers: dict[int, int] = Field(default_factory=dict)
    covers_usage: dict[int, int] = Field(default_factory=dict)


class LedgerEntry(Event):
    """One priced fact about one budget, from enrich to aggregate (keyed by budget id). No prompt text.

    ``occurred_at`` is the *request's* time for reserve and settle entries (the
    period and the dedupe horizon come from it); ``usage_at`` is when the call
    finished. A ``tick`` carries no budget: it moves stream time on its ledger
    partition, and ``expire`` says whether reservations past their TTL expire
    at it (decided when the tick was written, so that a replay decides alike).
    """

    entry_id: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    budget_id: LedgerAccount | None = None
    request_id: RequestId
    attempt: Annotated[int, Field(ge=0, strict=True)] = 0
    kind: EntryKind
    period: Annotated[str, StringConstraints(pattern=_PERIOD.pattern)]
    amount_pico_usd: Annotated[int, Field(strict=True, ge=-MAX_ENTRY_PICO, le=MAX_ENTRY_PICO)]
    model: Annotated[str, StringConstraints(max_length=256)] = ""
    provider: Annotated[str, StringConstraints(max_length=256)] = ""  # as long as an event's provider may be
    backend: Backend = "cloud"
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cached_input_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    tier: Tier = "exact"
    priced: bool = True
    price_version: Annotated[str, StringConstraints(max_length=512)] = ""  # e.g. reported:<provider>
    occurred_at: Timestamp
    usage_at: Timestamp | None = None
    outcome: Outcome | None = None
    ttl_s: Annotated[int, Field(gt=0, le=7 * 86400, strict=True)] | None = None
    expire: bool = False
    # Where the event it came from was (partition, offset): a reserve's request event on the requests topic, a
    # settle's usage event on the usage topic. What a status says it covers.
    source_partition: Annotated[int, Field(ge=0, strict=True)] | None = None
    source_offset: Annotated[int, Field(ge=0, strict=True)] | None = None
    # A lease entry asks for headroom for router ``request_id`` (its ``attempt`` numbers its asks); a reserve
    # admitted under a lease names the router, the lease's epoch and what the router charged to it.
    lease_router: LeaseRouter | None = None
    lease_epoch: Annotated[int, Field(ge=0, strict=True)] | None = None
    lease_pico: Annotated[int, Field(ge=0, le=MAX_ENTRY_PICO, strict=True)] | None = None
    # A ``partial`` entry: a shard's sums, sent by the shard's worker to the budget's home partition.
    shard_sum: ShardSum | None = None

    @model_validator(mode="after")
    def _budget_unless_tick(self) -> LedgerEntry:
        if self.kind != "tick" and self.budget_id is None:
            raise ValueError(f"a {self.kind} entry needs a budget_id")
        if self.kind in ("reserve", "settle", "lease") and self.amount_pico_usd < 0:
            raise ValueError(f"a {self.kind} amount cannot be negative")
        if self.kind == "lease" and self.ttl_s is None:
            raise ValueError("a lease entry needs its ttl_s")
        if (self.kind == "partial") != (self.shard_sum is not None):
            raise ValueError("a partial entry, and only a partial entry, carries a shard_sum")
        sharded = self.budget_id is not None and SHARD_MARK in self.budget_id
        if sharded and self.kind not in ("reserve", "settle", "adjust"):
            raise ValueError(f"a {self.kind} entry names a budget, not a shard")
        if (self.lease_router is None) != (self.lease_epoch is None) or (self.lease_epoch is None) != (
            self.lease_pico is None
        ):
            raise ValueError("lease_router, lease_epoch and lease_pico go together")
        return self


class BudgetStatus(Event):
    """A budget's state for the current period, as routers read it (compacted, keyed by budget id)."""

    budget_id: BudgetId
    period: Annotated[str, StringConstraints(pattern=_PERIOD.pattern)]
    status: StatusName
    previous_status: StatusName | None = None
    spend_usd: PicoUsd
    settled_usd: PicoUsd
    reserved_usd: PicoUsd
    limit_usd: PicoUsd | None = None
    remaining_usd: PicoUsd | None = None
    utilization_percent: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    soft_limit_percent: Annotated[int, Field(gt=0, lt=100)]
    hard_limit_action: HardLimitAction
    as_of: Timestamp
    next_reset: Timestamp
    reason: StatusReason
    partition: Annotated[int, Field(ge=0)]
    seq: Annotated[int, Field(ge=-1)]
    projected_month_end_usd: PicoUsd | None = None
    projected_hard_limit_at: Timestamp | None = None
    # Per requests-topic partition, the highest offset of a request event whose reserve this status counts, and
    # per usage-topic partition the same of usage events and settles (JSON keys are the partitions as strings). A
    # router stops counting its own admission of a request once a status covers its request or its usage event:
    # every earlier event of that partition is in it too.
    covers: dict[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] = {}
    covers_usage: dict[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] = {}


class LeaseAsk(Event):
    """A router asks for more headroom on a leased budget (its asks numbered in order, per router).

    Routers write these on the lease-asks topic; enrich turns each into a ``lease`` entry on the budget's ledger
    partition (routers never write the ledger), where the aggregate answers it with a :class:`LeaseGrant`.
    """

    router: LeaseRouter
    budget_id: BudgetId
    ask: Annotated[int, Field(ge=0, strict=True)]
    amount_usd: Annotated[PicoUsd, Field(ge=0)]
    occurred_at: Timestamp
    ttl_s: Annotated[int, Field(gt=0, le=3600, strict=True)]

    @property
    def period(self) -> str:
        return period_of(self.occurred_at)


class LeaseGrant(Event):
    """One router's lease on one budget's month, as the aggregate holds it (compacted, keyed ``budget|router``).

    In the lease's ``epoch``, the router was granted ``granted_usd`` in all and its reserves used ``used_usd``;
    the router may admit cloud spend against what it granted minus what it admitted in that epoch, until
    ``expires_at`` (less a margin: its reserves must reach the ledger before the lease is released).
    """

    budget_id: BudgetId
    period: Annotated[str, StringConstraints(pattern=_PERIOD.pattern)]
    router: LeaseRouter
    epoch: Annotated[int, Field(ge=0)]
    granted_usd: PicoUsd
    used_usd: PicoUsd
    expires_at: Timestamp
    asks: Annotated[int, Field(ge=-1)]
    as_of: Timestamp


class Heartbeat(Event):
    """Proof of life of one ledger partition's aggregate, and how far behind it and enrich are."""

    partition: Annotated[int, Field(ge=0)]
    as_of: Timestamp
    stream_time: Timestamp
    lag_s: Annotated[float, Field(ge=0)]
    enrich_lag_s: Annotated[float, Field(ge=0)] | None = None
    owner: Annotated[str, StringConstraints(max_length=512)] | None = None


class AuditRecord(Event):
    """Who changed a budget, when, and how: a policy change or a ledger adjustment (``budgetflow.audit``).

    ``old``/``new`` are the policy before and after (``None``: it did not exist / was deleted); ``revision`` is
    the offset of the new policy record on the policies topic, so it only grows. An adjustment carries its
    period, signed amount, reason and the ledger entry id it wrote.
    """

    kind: Literal["policy", "adjust"]
    budget_id: BudgetId
    at: Timestamp
    actor: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    principal: Annotated[str, StringConstraints(max_length=256)] | None = None
    revision: Annotated[int, Field(ge=0)] | None = None
    old: dict[str, Any] | None = None
    new: dict[str, Any] | None = None
    period: Annotated[str, StringConstraints(pattern=_PERIOD.pattern)] | None = None
    amount_usd: PicoUsd | None = None
    reason: Annotated[str, StringConstraints(max_length=1024)] | None = None
    entry_id: Annotated[str, StringConstraints(max_length=1024)] | None = None
