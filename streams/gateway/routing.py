"""Routing decisions from budget statuses: the cloud share, the affinity hash, rejections, headers.

Pure functions and small value types; :class:`~budgetflow.streams.gateway.view.BudgetView`
feeds them the statuses it follows. Nothing here imports Kafka.

The rule (docs/architecture.md, "The routing rule"): a budget's cloud share is 1 below its soft
limit, (100 − u) / (100 − soft) between the soft limit and 100 %, and 0 at
100 % or more. A request may go to cloud iff h < the smallest share of its
budgets, where h is the first 8 bytes of SHA-256 of the UTF-8 affinity key
(the session id if given, else the request id) as a big-endian integer / 2^64:
the same session keeps landing on the same side as the share moves. A request
past the share goes to local first, with cloud kept after it as a fallback
unless a blocking action (``block_cloud`` at the hard limit, ``block_all``) takes it away.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from budgetflow.schemas.money import format_usd
from budgetflow.schemas.periods import next_month_start
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.serde import dumps
from budgetflow.streams.rules.status import STATUS_RANK, utilization_percent

__all__ = [
    "BudgetState",
    "Candidate",
    "Decision",
    "Rejection",
    "affinity",
    "cloud_share",
    "decide",
    "exceeded",
    "headers_for",
    "state_json",
    "unseen_state",
]

Backend = Literal["cloud", "local"]
Action = Literal["warn", "block_cloud", "block_all"]


def affinity(key: str) -> float:
    """h in [0, 1): the first 8 bytes of SHA-256 of the UTF-8 key, big-endian, / 2^64."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def cloud_share(utilization: float | None, soft_limit_percent: int, status: str = "normal") -> float:
    """How much of a budget's traffic may still go to cloud."""
    if status == "hard_limit" or (utilization is not None and utilization >= 100):
        return 0.0
    if utilization is None or utilization < soft_limit_percent:
        # Unlimited, or below the soft limit (a soft status in the hysteresis band
        # below it still has the full share).
        return 1.0
    return max(0.0, min(1.0, (100 - utilization) / (100 - soft_limit_percent)))


@dataclass(frozen=True, slots=True)
class Candidate:
    """A place a request may be sent: a model or deployment, on cloud or local, with a preference score."""

    name: str
    backend: Backend
    score: float = 0.0
    provider: str | None = None  # for budget scopes that name one (default: the request's)
    priced: bool = True  # False: the price table has no price for it (budgets with `unpriced: block` refuse it)


@dataclass(frozen=True, slots=True)
class BudgetState:
    """What a router knows of one budget right now (after staleness and rollover are applied)."""

    budget_id: str
    period: str
    status: str = "normal"
    spend_pico: int = 0
    limit_pico: int | None = None
    utilization: float | None = None
    soft_limit_percent: int = 75
    hard_limit_action: Action = "warn"
    next_reset: datetime | None = None
    stale: bool = False
    seen: bool = True

    @property
    def remaining_pico(self) -> int | None:
        return None if self.limit_pico is None else max(self.limit_pico - self.spend_pico, 0)

    @property
    def share(self) -> float:
        return cloud_share(self.utilization, self.soft_limit_percent, self.status)


def unseen_state(budget_id: str, period: str, policy: BudgetPolicy | None) -> BudgetState:
    """A budget with no status yet: nothing spent this month, under its policy's limit already when the policy is
    known (routers that admit before the first status must not admit without its limit)."""
    reset = next_month_start(period)
    limit = policy.monthly_limit_usd if policy is not None else None
    if policy is None or limit is None:
        return BudgetState(budget_id, period, next_reset=reset, seen=False)
    u = utilization_percent(0, limit)
    return BudgetState(
        budget_id,
        period,
        status="hard_limit" if u is not None and u >= 100 else "normal",
        limit_pico=limit,
        utilization=u,
        soft_limit_percent=policy.soft_limit_percent,
        hard_limit_action=policy.hard_limit_action,
        next_reset=reset,
        seen=False,
    )


@dataclass(frozen=True)
class Rejection:
    """Why a request is rejected: the budget, its month, its spend and limit, and when it resets."""

    budget_id: str
    period: str
    spend_pico: int
    limit_pico: int | None
    next_reset: datetime | None
    message: str
    http_status: int = 429
    budget_headers: dict[str, str] = field(default_factory=dict)

    @property
    def retry_after_s(self) -> int:
        if self.next_reset is None:
            return 3600
        return max(1, int((self.next_reset - datetime.now(UTC)).total_seconds()))

    def to_response(self) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body): an OpenAI-style 429 that the OpenAI and Anthropic SDKs do not retry."""
        body = {
            "error": {
                "message": self.message,
                "type": "insufficient_quota",
                "param": None,
                "code": "budget_exceeded",
                "budget_id": self.budget_id,
                "period": self.period,
                "spend_usd": format_usd(self.spend_pico, 6),
                "limit_usd": None if self.limit_pico is None else format_usd(self.limit_pico, 6),
                "resets_at": None if self.next_reset is None else self.next_reset.isoformat(),
            }
        }
        headers = {
            "content-type": "application/json",
            "x-should-retry": "false",
            "retry-after": str(self.retry_after_s),
            **self.budget_headers,
        }
        return self.http_status, headers, dumps(body)


@dataclass(slots=True)
class Decision:
    """Where a request may go: candidates in order, or the rejection that refuses it."""

    candidates: tuple[Candidate, ...]
    rejection: Rejection | None
    cloud_allowed: bool
    cloud_share: float
    affinity: float
    deciding: BudgetState | None = None
    flags: tuple[str, ...] = ()
    fallbacks: tuple[Candidate, ...] = ()  # the candidates (last in ``candidates``) to use only if the others fail

    @property
    def ok(self) -> bool:
        return self.rejection is None

    def is_fallback(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` is only a fallback (cloud after local for a request past the cloud share)."""
        return candidate in self.fallbacks


def _strictest(states: Sequence[BudgetState], shares: Sequence[float]) -> BudgetState | None:
    """The budget that decides: lowest share, then highest status, then least remaining."""
    if not states:
        return None
    best = 0
    for i in range(1, len(states)):
        a, b = states[i], states[best]
        key_a = (shares[i], -STATUS_RANK.get(a.status, 0), a.remaining_pico or 0)
        key_b = (shares[best], -STATUS_RANK.get(b.status, 0), b.remaining_pico or 0)
        if key_a < key_b:
            best = i
    return states[best]


def decide(
    request_id: str,
    states: Sequence[BudgetState],
    candidates: Sequence[Candidate],
    *,
    session_id: str | None = None,
) -> Decision:
    """The routing rule over the request's budgets (pure; the view catches anything unexpected)."""
    h = affinity(session_id if session_id else request_id)
    shares = [cloud_share(s.utilization, s.soft_limit_percent, s.status) for s in states]
    share = min(shares, default=1.0)
    deciding = _strictest(states, shares)
    ordered = sorted(candidates, key=lambda c: -c.score)
    cloud = [c for c in ordered if c.backend == "cloud"]
    local = [c for c in ordered if c.backend == "local"]
    flags: list[str] = []
    if any(s.stale for s in states):
        flags.append("stale")
    hard = [s for s in states if s.status == "hard_limit" or (s.utilization is not None and s.utilization >= 100)]
    blocking_all = [s for s in hard if s.hard_limit_action == "block_all"]
    if blocking_all:
        return Decision(
            (), exceeded(blocking_all[0], "blocks all traffic"), False, share, h, blocking_all[0], tuple(flags)
        )
    cloud_allowed = h < share
    if cloud_allowed:
        return Decision(tuple(ordered), None, True, share, h, deciding, tuple(flags))
    blocking_cloud = [s for s in hard if s.hard_limit_action == "block_cloud"]
    if local:
        # Local preferred: cloud stays as a fallback for a local model that fails, unless a block takes it away.
        flags.append("shifted_to_local")
        fallbacks = () if blocking_cloud else tuple(cloud)
        return Decision((*local, *fallbacks), None, False, share, h, deciding, tuple(flags), fallbacks)
    # No local candidate: warn keeps cloud (flagged), and so does a soft limit; a hard block rejects.
    if blocking_cloud:
        return Decision(
            (),
            exceeded(blocking_cloud[0], "blocks cloud traffic and no local model is available"),
            False,
            share,
            h,
            blocking_cloud[0],
            tuple(flags),
        )
    flags.append("over_budget_kept_cloud" if hard else "soft_limit_kept_cloud")
    return Decision(tuple(cloud), None, True, share, h, deciding, tuple(flags))


def exceeded(state: BudgetState, what: str) -> Rejection:
    limit = "unlimited" if state.limit_pico is None else f"${format_usd(state.limit_pico, 2)}"
    message = (
        f"Budget {state.budget_id} has reached its limit for {state.period} (spent "
        f"${format_usd(state.spend_pico, 2)} of {limit}); its hard-limit action {what}."
    )
    return Rejection(
        budget_id=state.budget_id,
        period=state.period,
        spend_pico=state.spend_pico,
        limit_pico=state.limit_pico,
        next_reset=state.next_reset,
        message=message,
        budget_headers=headers_for(state, None),
    )


def headers_for(state: BudgetState | None, estimated_cost_pico: int | None) -> dict[str, str]:
    """The X-Budget-* headers (docs/gateways.md): the cost estimate always, the deciding budget when it is not
    normal."""
    headers: dict[str, str] = {}
    if estimated_cost_pico is not None:
        headers["X-Budget-Cost-Estimated"] = format_usd(estimated_cost_pico, 6)
    if state is None or state.status == "normal":
        return headers
    headers["X-Budget-Id"] = state.budget_id
    headers["X-Budget-Status"] = state.status
    if state.utilization is not None:
        headers["X-Budget-Utilization"] = f"{state.utilization:.2f}"
    remaining = state.remaining_pico
    if remaining is not None:
        headers["X-Budget-Remaining"] = format_usd(remaining, 2)
    if state.next_reset is not None:
        headers["X-Budget-Reset"] = state.next_reset.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return headers


def merge_decisions(parts: Sequence[Decision], candidates: Sequence[Candidate]) -> Decision:
    """One decision from the decisions over groups of candidates charged to different budgets (a model-scoped
    budget binds only its model's candidates): every candidate some group allows, in score order, the fallbacks
    last; a rejection only when every group rejects."""
    allowed = {id(c) for part in parts for c in part.candidates}
    fallback = {id(c) for part in parts for c in part.fallbacks}
    by_score = [c for c in sorted(candidates, key=lambda c: -c.score) if id(c) in allowed]
    first = tuple(c for c in by_score if id(c) not in fallback)
    fallbacks = tuple(c for c in by_score if id(c) in fallback)
    flags = tuple(dict.fromkeys(f for part in parts for f in part.flags))
    strictest = min(parts, key=lambda part: part.cloud_share)
    if not by_score:
        rejected = next((part for part in parts if part.rejection is not None), strictest)
        return Decision(
            (), rejected.rejection, False, strictest.cloud_share, rejected.affinity, rejected.deciding, flags
        )
    cloud = any(c.backend == "cloud" for c in first)
    return Decision(
        (*first, *fallbacks),
        None,
        cloud,
        strictest.cloud_share,
        strictest.affinity,
        strictest.deciding,
        flags,
        fallbacks,
    )


def state_json(state: BudgetState) -> dict[str, Any]:
    """A budget as a router sees it, for JSON answers (amounts as decimal USD strings)."""
    from budgetflow.schemas.money import usd_string

    return {
        "budget_id": state.budget_id,
        "period": state.period,
        "status": state.status,
        "spend_usd": usd_string(state.spend_pico),
        "limit_usd": None if state.limit_pico is None else usd_string(state.limit_pico),
        "remaining_usd": None if state.remaining_pico is None else usd_string(state.remaining_pico),
        "utilization_percent": state.utilization,
        "soft_limit_percent": state.soft_limit_percent,
        "hard_limit_action": state.hard_limit_action,
        "next_reset": state.next_reset.isoformat() if state.next_reset else None,
        "stale": state.stale,
    }
