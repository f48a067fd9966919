"""BudgetView: the router's picture of every budget, followed from the status and heartbeat topics.

A gateway or router keeps one view per process::

    async with BudgetView(settings) as view:
        await view.ready()
        decision = view.decide(request_id, ["team:search"], candidates, session_id=sid)

It keeps the latest status per budget (highest ``seq``; on a tie the later
record), reads a status of a past month as ``normal`` for the new one
(rollover on read), marks budgets stale when their partition's heartbeat is
old or reports lag, and counts what this router admitted until a status
covers it, so that one router alone cannot overrun the remaining budget
between two statuses (:mod:`budgetflow.streams.gateway.admissions`). ``decide`` is pure and never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import BudgetStatus, Heartbeat, LeaseGrant, LeaseTag, period_of
from budgetflow.schemas.periods import month_start, next_month_start
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.serde import decode
from budgetflow.schemas.settings import Settings, load_settings
from budgetflow.streams.gateway.admissions import Admission, Admissions, Seen, charged_budgets, covers_of
from budgetflow.streams.gateway.leasebook import LeaseBook, open_lease_book
from budgetflow.streams.gateway.routing import (
    BudgetState,
    Candidate,
    Decision,
    Rejection,
    affinity,
    decide,
    exceeded,
    headers_for,
    merge_decisions,
    unseen_state,
)
from budgetflow.streams.gateway.viewstate import BeatRecord, StatusRecord, published_state, rolled_over
from budgetflow.streams.kafka.follow import Follower
from budgetflow.streams.kafka.topics import Topics
from budgetflow.streams.rules.clock import Clock
from budgetflow.streams.rules.policies import PolicyBook
from budgetflow.streams.rules.scopes import BudgetResolver, with_global
from budgetflow.streams.rules.shards import global_shards, is_leased
from budgetflow.streams.rules.status import STATUS_RANK, utilization_percent
from budgetflow.streams.service.lifecycle import Lifecycle

if TYPE_CHECKING:
    from budgetflow.streams.gateway.publisher import RequestHandle

__all__ = ["BudgetView"]

log = logging.getLogger(__name__)


class BudgetView(Lifecycle):
    """Follows statuses and heartbeats; answers ``status``, ``decide``, ``admit`` and ``headers``."""

    def __init__(self, settings: Settings | None = None, *, clock: Clock | None = None) -> None:
        self.settings = settings or load_settings()
        self.topics = Topics.from_settings(self.settings)
        self.clock = clock or Clock(self.settings.clock)
        self._statuses: dict[str, StatusRecord] = {}
        self._beats: dict[int, BeatRecord] = {}
        view = self.settings.view
        self.admissions = Admissions(view.admit_max_age_s, view.admit_grace_s, self._seen)
        self._unseen: dict[str, tuple[float, float, BudgetState]] = {}  # budgets with no status: normal
        self._ready = asyncio.Event()
        self._follower: Follower | None = None
        self.lease_book: LeaseBook | None = None
        self._stop_leases: Callable[[], Awaitable[None]] | None = None
        self.records_seen = 0
        self.stale_records = 0
        self.decisions: dict[str, int] = {}
        self.fallbacks_taken = 0
        # With the policies followed: the budgets enrich charges (scoped ones, parents) decide routing too.
        self.resolver: BudgetResolver | None = None
        self._policy_source: Callable[[], Mapping[str, BudgetPolicy]] = dict
        self._policies: PolicyBook | None = None

    # -- life cycle -------------------------------------------------------------------
    async def start(self) -> None:
        if self.settings.view.leases:
            self.lease_book, self._stop_leases = await open_lease_book(self.settings, self.topics.lease_asks.name)
        follower = Follower(
            self.settings,
            [self.topics.status.name, self.topics.heartbeats.name, self.topics.leases.name],
            lambda r: self._absorb(r.topic, r.key, r.value),
            name="budget-view",
            caught_up=self._ready,  # the view is ready when the follower has caught up
        )
        await follower.start()
        self._follower = follower
        if self.settings.view.follow_policies:
            book = PolicyBook(self.settings, self.topics.policies.name, on_change=lambda _: self._policies_changed())
            await book.start()
            self._policies = book
            self.use_policies(lambda: book.policies)

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()
        if self._policies is not None:
            await self._policies.stop()
        if self._stop_leases is not None:
            await self._stop_leases()

    async def ready(self, timeout_s: float | None = None) -> None:
        """Wait until the view has read both topics up to where they were when it started."""
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    # -- feeding (also used by tests and `view serve`) ----------------------------------
    def _absorb(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        self.records_seen += 1
        if topic == self.topics.leases.name:
            with contextlib.suppress(InvalidEvent):
                if self.lease_book is not None and value is not None:
                    self.lease_book.granted(decode(LeaseGrant, value)[0])
            return
        if topic == self.topics.heartbeats.name:
            try:
                beat, _ = decode(Heartbeat, value)
            except InvalidEvent:
                return
            self.apply_heartbeat(beat)
            return
        if value is None:
            if key is not None:
                self._statuses.pop(key.decode(errors="replace"), None)
            return
        try:
            record, _ = decode(BudgetStatus, value)
        except InvalidEvent:
            return
        self.apply_status(record)

    def apply_status(self, record: BudgetStatus) -> bool:
        """Keep a status unless an already known one has a higher ``seq``; True if kept."""
        current = self._statuses.get(record.budget_id)
        if current is not None and record.seq < current.seq:
            self.stale_records += 1
            return False
        self._statuses[record.budget_id] = StatusRecord(
            seq=record.seq,
            period=record.period,
            status=record.status,
            spend=record.spend_usd,
            limit=record.limit_usd,
            soft=record.soft_limit_percent,
            action=record.hard_limit_action,
            partition=record.partition,
            as_of=record.as_of.timestamp(),
            reset_ts=record.next_reset.timestamp(),
            covers=covers_of(record.covers, record.covers_usage),
        )
        self.admissions.status_arrived(record.budget_id, self._statuses[record.budget_id].seen())
        return True

    def apply_heartbeat(self, beat: Heartbeat) -> None:
        self._beats[beat.partition] = BeatRecord(beat.as_of.timestamp(), beat.lag_s, beat.owner)

    def heartbeat_ages(self, now: datetime | None = None) -> dict[int, float]:
        """Seconds since each partition's last heartbeat, on the view's clock."""
        ts = (now or self.clock.now()).timestamp()
        return {p: max(0.0, ts - beat.as_of) for p, beat in self._beats.items()}

    def owner(self, partition: int) -> str | None:
        """The URL of the aggregate worker that last sent this partition's heartbeat."""
        beat = self._beats.get(partition)
        return beat.owner if beat is not None else None

    # -- answers --------------------------------------------------------------------------
    def budgets(self) -> list[str]:
        return list(self._statuses)

    def status(self, budget_id: str, *, now: datetime | None = None) -> BudgetState:
        """A budget as a router should treat it now: rollover, staleness and admissions applied."""
        moment = now or self.clock.now()
        ts = moment.timestamp()
        record = self._statuses.get(budget_id)
        if record is None:
            unseen = self._unseen_state(budget_id, moment)
            return self._with_admitted(unseen, ts) if budget_id in self.admissions else unseen
        base = published_state(budget_id, record)
        if ts >= record.reset_ts:
            return self._with_admitted(rolled_over(base, moment), ts)
        age, lag = self._age(record, ts)
        view = self.settings.view
        if age > view.expire_after_s:
            if view.stale_mode == "open":
                return replace(base, status="normal", utilization=None, stale=True)
            closed = replace(base, status="hard_limit", utilization=100.0, hard_limit_action="block_cloud")
            return replace(closed, stale=True)
        if age > view.stale_after_s or lag > view.stale_after_s:
            base = replace(base, stale=True)
        return self._with_admitted(base, ts) if budget_id in self.admissions else base

    def _age(self, record: StatusRecord, ts: float) -> tuple[float, float]:
        """How old what the view knows of a budget's partition is at ``ts``, and the lag its worker reported."""
        beat = self._beats.get(record.partition)
        age = ts - (beat.as_of if beat is not None else record.as_of)
        return age, beat.lag_s if beat is not None else 0.0

    def _failed_open(self, budget_id: str, ts: float) -> bool:
        """The budget's status expired and ``VIEW__STALE_MODE`` is open: the operator chose to let traffic through
        while the aggregate is away, so its cap is not enforced (nor leased) until it is back."""
        record = self._statuses.get(budget_id)
        view = self.settings.view
        return record is not None and view.stale_mode == "open" and self._age(record, ts)[0] > view.expire_after_s

    def _unseen_state(self, budget_id: str, moment: datetime) -> BudgetState:
        """A budget with no status yet: unspent this month, under its policy if known (cached per month and
        policies, the cache bounded)."""
        ts = moment.timestamp()
        cached = self._unseen.get(budget_id)
        if cached is None or not cached[0] <= ts < cached[1]:
            current = period_of(moment)
            reset = next_month_start(current)
            state = unseen_state(budget_id, current, self._policy_source().get(budget_id))
            cached = (month_start(current).timestamp(), reset.timestamp(), state)
            if len(self._unseen) > 10_000:
                self._unseen.clear()
            self._unseen[budget_id] = cached
        return cached[2]

    def last_status(self, budget_id: str, *, now: datetime | None = None) -> BudgetState:
        """A budget as last published, rolled over on read and flagged stale, for reporting (the stats API).

        Unlike :meth:`status` it neither applies ``VIEW__STALE_MODE`` (a router's choice of what to do without
        fresh news, not a fact about the budget) nor this router's admissions.
        """
        moment = now or self.clock.now()
        record = self._statuses.get(budget_id)
        if record is None:
            current = period_of(moment)
            return BudgetState(budget_id, current, next_reset=next_month_start(current), seen=False)
        state = published_state(budget_id, record)
        ts = moment.timestamp()
        if ts >= record.reset_ts:
            return rolled_over(state, moment)
        beat = self._beats.get(record.partition)
        age = ts - (beat.as_of if beat is not None else record.as_of)
        lag = beat.lag_s if beat is not None else 0.0
        stale = max(age, lag) > self.settings.view.stale_after_s
        return replace(state, stale=True) if stale else state

    def _with_admitted(self, state: BudgetState, ts: float) -> BudgetState:
        extra = self.admissions.pending(state.budget_id, state.period, ts)
        if not extra:
            return state
        spend = state.spend_pico + extra
        u = utilization_percent(spend, state.limit_pico)
        status = state.status
        if u is not None and u >= 100:
            status = "hard_limit"
        elif u is not None and u >= state.soft_limit_percent and status == "normal":
            status = "soft_limit"
        return replace(state, status=status, spend_pico=spend, utilization=u)

    def admit(
        self,
        budgets: Sequence[str],
        estimate_pico: int,
        *,
        now: datetime | None = None,
        request: RequestHandle | None = None,
        source: tuple[int, int] | None = None,
    ) -> Admission:
        """Count cloud spend this router let through, until a status of each budget it is charged to (parents and
        scopes included, as ``decide`` holds it to them) covers its request or usage event.

        Say where the request event went: ``request``, the publisher's handle (its positions are noted when the
        broker acknowledges them), or ``source``, its (partition, offset) on the requests topic. Without either,
        a status ``VIEW__ADMIT_GRACE_S`` newer than the admission is taken to include it.
        """
        moment = now or self.clock.now()
        charged = charged_budgets(self.resolver, budgets, request)
        return self.admissions.admit(moment, estimate_pico, charged, request=request, source=source)

    async def lease(
        self, budgets: Sequence[str], estimate_pico: int, *, request: RequestHandle | None = None
    ) -> LeaseTag | Rejection | None:
        """Charge a cloud request to this router's leases on the leased budgets it is charged to (waiting up to
        ``VIEW__LEASE_WAIT_MS`` for grants): the tag for its request event, None when no budget is leased, or the
        rejection to answer with when a lease could not cover it."""
        if self.lease_book is None:
            return None
        policies = self._policy_source()
        charged = charged_budgets(self.resolver, budgets, request)
        moment = self.clock.now()
        ts = moment.timestamp()
        shards = global_shards(self.settings)
        leased = [
            b for b in charged if b in policies and is_leased(policies[b], shards) and not self._failed_open(b, ts)
        ]
        if not leased:
            return None
        tag = await self.lease_book.take(leased, estimate_pico, moment)
        if not isinstance(tag, str):
            return tag
        at_cap = replace(self.status(tag), status="hard_limit")  # what is left is leased: the cap, for this request
        return exceeded(at_cap, "leaves no headroom for it")

    def _seen(self, budget: str) -> Seen | None:
        record = self._statuses.get(budget)
        return record.seen() if record is not None else None

    def decide(
        self,
        request_id: str,
        budgets: Sequence[str],
        candidates: Sequence[Candidate],
        *,
        session_id: str | None = None,
        now: datetime | None = None,
        provider: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Decision:
        """Where the request may go (the routing rule over its budgets, ``global`` included). Never raises.

        With the policies followed, each candidate is held to the budgets enrich would charge for it: those
        named, the scoped budgets its model, provider, backend and the request's ``metadata`` match, and every
        parent of those.
        """
        try:
            moment = now or self.clock.now()
            groups = self._budget_groups(budgets, candidates, provider, metadata or {})
            parts = [
                self._decide_group(request_id, group, members, session_id, moment) for group, members in groups.items()
            ]
            decision = parts[0] if len(parts) == 1 else merge_decisions(parts, candidates)
        except Exception:  # a router must answer: fail open, and say so
            log.exception("budget decision failed; letting the request through")
            from budgetflow.streams.gateway.routing import affinity

            decision = Decision(
                tuple(candidates), None, True, 1.0, affinity(session_id or request_id), None, ("decision_error",)
            )
        outcome = "rejected" if decision.rejection else ("cloud" if decision.cloud_allowed else "local")
        self.decisions[outcome] = self.decisions.get(outcome, 0) + 1
        return decision

    def fallback_taken(self, decision: Decision, candidate: Candidate) -> None:
        """Say the gateway called ``candidate`` because the ones before it failed; counts it if it is a fallback
        (``budgetflow_router_fallbacks_total``)."""
        if decision.is_fallback(candidate):
            self.fallbacks_taken += 1

    def use_policies(self, source: Callable[[], Mapping[str, BudgetPolicy]]) -> None:
        """Decide with these policies (``start`` does it with the policies topic when VIEW__FOLLOW_POLICIES)."""
        self._policy_source = source
        self.resolver = BudgetResolver(source)
        self._unseen.clear()

    def _policies_changed(self) -> None:
        self._unseen.clear()
        if self.resolver is not None:
            self.resolver.invalidate()

    def _decide_group(
        self,
        request_id: str,
        budgets: tuple[str, ...],
        candidates: list[Candidate],
        session_id: str | None,
        moment: datetime,
    ) -> Decision:
        states = [self.status(b, now=moment) for b in budgets]
        policies = self._policy_source()
        strict = [b for b in budgets if b in policies and policies[b].unpriced == "block"]
        unpriced = [c for c in candidates if c.backend == "cloud" and not c.priced]
        if strict and unpriced:
            # A budget that refuses unpriced models: their cost could not be counted exactly.
            kept = [c for c in candidates if c not in unpriced]
            if not kept:
                state = next(s for s in states if s.budget_id == strict[0])
                error = Rejection(
                    state.budget_id,
                    state.period,
                    state.spend_pico,
                    state.limit_pico,
                    None,
                    f"Budget {state.budget_id} refuses models with no price "
                    f"({', '.join(c.name for c in unpriced)}), and no priced model is offered.",
                    http_status=403,
                )
                return Decision((), error, False, 0.0, affinity(session_id or request_id), state, ("unpriced",))
            decision = decide(request_id, states, kept, session_id=session_id)
            return replace(decision, flags=(*decision.flags, "unpriced_refused"))
        return decide(request_id, states, candidates, session_id=session_id)

    def _budget_groups(
        self, budgets: Sequence[str], candidates: Sequence[Candidate], provider: str | None, metadata: Mapping[str, str]
    ) -> dict[tuple[str, ...], list[Candidate]]:
        """Candidates grouped by the budgets they are charged to (one group when no scope tells them apart)."""
        if self.resolver is None:
            return {tuple(with_global(budgets)): list(candidates)}
        if not self.resolver.has_scopes:  # only parents: every candidate is charged alike
            charged = self.resolver.resolve(
                budgets, model="", provider=provider or "", backend="cloud", metadata=metadata
            )
            return {tuple(charged): list(candidates)}
        groups: dict[tuple[str, ...], list[Candidate]] = {}
        for c in candidates:
            key = tuple(
                self.resolver.resolve(
                    budgets, model=c.name, provider=c.provider or provider or "", backend=c.backend, metadata=metadata
                )
            )
            groups.setdefault(key, []).append(c)
        return groups or {tuple(with_global(budgets)): []}

    def headers(
        self, budgets: Sequence[str], estimated_cost_pico: int | None, *, now: datetime | None = None
    ) -> dict[str, str]:
        """The X-Budget-* headers for a response: the deciding budget when it is not normal."""
        states = [self.status(b, now=now) for b in with_global(budgets)]
        worst = max(
            states,
            key=lambda s: (STATUS_RANK.get(s.status, 0), -(s.remaining_pico or 0)),
            default=None,
        )
        return headers_for(worst, estimated_cost_pico)

    def snapshot(self) -> dict[str, Any]:
        """How much the view holds (for `view serve` and the benchmarks)."""
        return {
            "budgets": len(self._statuses),
            "partitions_with_heartbeat": len(self._beats),
            "ready": self.is_ready,
            "records_seen": self.records_seen,
        }
