"""What the enrich stage makes of one record: requests and usage in, one priced ledger entry per budget out.

Stateless and deterministic: the same event and price table give the same
entries (with deterministic ids) on any worker and on any redelivery, so
at-least-once delivery is enough here; the aggregate makes it exact. No
prompt text leaves this stage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import MAX_TOKENS, Backend, LeaseAsk, LeaseTag, RequestEvent, UsageEvent, entry_id
from budgetflow.schemas.money import MAX_ENTRY_PICO, format_usd, pico_to_float_usd
from budgetflow.schemas.serde import decode, dumps
from budgetflow.streams.kafka.dlq import DeadLetter
from budgetflow.streams.kafka.topics import Topics
from budgetflow.streams.rules.clock import Clock
from budgetflow.streams.rules.scopes import BudgetResolver, with_global
from budgetflow.streams.service.metrics import PipelineMetrics
from budgetflow.tokenizers.estimate import Estimator
from budgetflow.tokenizers.pricing import Cost

__all__ = ["EnrichResult", "Enricher"]

log = logging.getLogger(__name__)


@dataclass
class EnrichResult:
    """What one input record became: ledger entries as (budget id, JSON), or a dead letter."""

    entries: list[tuple[str, bytes]] = field(default_factory=list)
    dead: DeadLetter | None = None


class Enricher:
    """Turns one raw input record into ledger entries, or into a dead letter."""

    def __init__(
        self,
        estimator: Estimator,
        topics: Topics,
        *,
        keep_raw: bool = False,
        metrics: PipelineMetrics | None = None,
        clock: Clock | None = None,
        max_clock_skew_s: float = 300.0,
        resolver: BudgetResolver | None = None,
    ) -> None:
        self.estimator = estimator
        self.topics = topics
        self.keep_raw = keep_raw
        self.metrics = metrics or PipelineMetrics()
        self.clock = clock or Clock()
        self.max_clock_skew_s = max_clock_skew_s
        # Without one (tests, benchmarks): the budgets the gateway names, and global.
        self.resolver = resolver

    def _budgets_of(
        self, listed: list[str], model: str, provider: str, backend: str, metadata: dict[str, str]
    ) -> list[str]:
        if self.resolver is None:
            return with_global(listed)
        return self.resolver.resolve(listed, model=model, provider=provider, backend=backend, metadata=metadata)

    def _entries(
        self, common: dict[str, Any], budgets: list[str], request_id: str, lease: LeaseTag | None = None
    ) -> list[tuple[str, bytes]]:
        """One entry per budget, keyed by its ledger account (a shard of a sharded budget, which has no lease)."""
        accounts = [(b, b) for b in budgets] if self.resolver is None else self.resolver.accounts(budgets, request_id)
        if lease is None:
            return [(account, entry_json(common, account)) for _, account in accounts]
        return [
            (account, entry_json({**common, **_lease_fields(lease, budget)} if account == budget else common, account))
            for budget, account in accounts
        ]

    def enrich(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> EnrichResult:
        is_request = topic == self.topics.requests.name
        try:
            if topic == self.topics.lease_asks.name:
                asked, unknown = decode(LeaseAsk, value)
                self._not_future(asked.occurred_at, "occurred_at")
                result = EnrichResult(self.ask(asked))
            elif is_request:
                request, unknown = decode(RequestEvent, value)
                self._not_future(request.occurred_at, "occurred_at")
                result = EnrichResult(self.reserve(request, source=(partition, offset)))
            else:
                usage, unknown = decode(UsageEvent, value)
                self._not_future(usage.request_occurred_at, "request_occurred_at")
                self._not_future(usage.occurred_at, "occurred_at")
                result = EnrichResult(self.settle(usage, source=(partition, offset)))
        except InvalidEvent as exc:
            return self._dead(exc.reason, str(exc), topic, partition, offset, key, value)
        except Exception as exc:  # a defect must not stop the stream on one record: DLQ it, loudly
            log.exception("enrich failed on %s[%d]@%d; dead-lettered as internal", topic, partition, offset)
            return self._dead(
                "internal", f"enrich failed: {exc.__class__.__name__}", topic, partition, offset, key, value
            )
        if unknown:
            self.metrics.unknown_fields.labels("requests" if is_request else "usage").inc(len(unknown))
        return result

    def _dead(
        self, reason: str, message: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> EnrichResult:
        self.metrics.dead_letters.labels("enrich", reason).inc()
        return EnrichResult(
            dead=DeadLetter.of_record(
                "enrich", reason, message, topic, partition, offset, key, value, keep_raw=self.keep_raw
            )
        )

    def _not_future(self, moment: datetime, field: str) -> None:
        """An event from beyond the allowed clock skew would count in a month that has not begun."""
        ahead = (moment - self.clock.now()).total_seconds()
        if ahead > self.max_clock_skew_s:
            raise InvalidEvent(
                "future", f"{field}: {ahead:.0f} s ahead of the clock (skew allowed: {self.max_clock_skew_s:.0f} s)"
            )

    def _model_label(self, model: str, backend: Backend, provider: str) -> str:
        price = self.estimator.table.price(model, backend=backend, provider=provider)
        return self.metrics.models(price.match) if price.priced else "other"

    def reserve(self, event: RequestEvent, source: tuple[int, int] | None = None) -> list[tuple[str, bytes]]:
        """The reserve entries of a request event, one per budget it is charged to; ``source`` is the event's
        (partition, offset) on the requests topic, which the statuses that count it will say they cover."""
        began = time.perf_counter()
        estimate = self.estimator.estimate(event)
        if estimate.input_tokens > MAX_TOKENS:
            raise InvalidEvent(
                "out_of_range", f"input: {estimate.input_tokens} tokens, more than a ledger entry holds ({MAX_TOKENS})"
            )
        m = self.metrics
        m.child(m.count_duration, estimate.tier).observe(time.perf_counter() - began)
        label = self._model_label(event.model, event.backend, event.provider)
        m.child(m.tokens, estimate.tier, label, "input").inc(estimate.input_tokens)
        if not estimate.priced:
            m.child(m.unpriced, m.unpriced_models(event.model)).inc()
        common = {
            "request_id": event.request_id,
            "attempt": event.attempt,
            "kind": "reserve",
            "period": event.period,
            "amount_pico_usd": estimate.pico_usd,
            "model": event.model,
            "provider": event.provider,
            "backend": estimate.backend,
            "input_tokens": estimate.input_tokens,
            "output_tokens": estimate.output_tokens,
            "tier": estimate.tier,
            "priced": estimate.priced,
            "price_version": estimate.price_version,
            "occurred_at": event.occurred_at,
            "ttl_s": estimate.ttl_s,
        }
        if source is not None:
            common["source_partition"], common["source_offset"] = source
        budgets = self._budgets_of(event.budgets, event.model, event.provider, event.backend, event.metadata)
        if log.isEnabledFor(logging.DEBUG):  # counts and ids only: never the prompt
            log.debug(
                "request %s attempt %d: %d input tokens (%s), model %s, reserve $%s on %s",
                event.request_id,
                event.attempt,
                estimate.input_tokens,
                estimate.tier,
                event.model,
                format_usd(estimate.pico_usd),
                ",".join(budgets),
            )
        return self._entries(common, budgets, event.request_id, event.lease)

    def ask(self, event: LeaseAsk) -> list[tuple[str, bytes]]:
        """A router's ask for headroom, as the lease entry the aggregate answers (ordered with the budget's entries)."""
        common = {
            "request_id": event.router,
            "attempt": event.ask,
            "kind": "lease",
            "period": event.period,
            "amount_pico_usd": min(event.amount_usd, MAX_ENTRY_PICO),  # more than an entry holds is never granted
            "occurred_at": event.occurred_at,
            "ttl_s": event.ttl_s,
        }
        return [(event.budget_id, entry_json(common, event.budget_id))]

    def settle(self, event: UsageEvent, source: tuple[int, int] | None = None) -> list[tuple[str, bytes]]:
        """The settle entries of a usage event, one per budget; ``source`` is its (partition, offset) on the usage
        topic."""
        cost = self.estimator.price_usage(event)
        if cost.pico_usd > MAX_ENTRY_PICO:
            raise InvalidEvent(
                "out_of_range",
                f"cost ${format_usd(cost.pico_usd, 2)} is past the bound of one "
                f"entry (${format_usd(MAX_ENTRY_PICO, 0)})",
            )
        # The TTL its reserve had (the request's model at the request's time); the ledger keeps the first one anyway.
        price = self.estimator.table.price(
            event.request_model or event.model,
            backend=event.backend,
            provider=event.provider,
            at=event.request_occurred_at,
        )
        ttl = price.reservation_ttl_s or self.estimator.reservation.ttl_s
        self._count_usage(event, cost)
        common = {
            "request_id": event.request_id,
            "attempt": event.attempt,
            "kind": "settle",
            "period": event.period,
            "amount_pico_usd": cost.pico_usd,
            "model": event.model,
            "provider": event.provider,
            "backend": cost.backend,
            "input_tokens": event.input_tokens,
            "output_tokens": event.output_tokens,
            "cached_input_tokens": event.cached_input_tokens,
            "reasoning_tokens": event.reasoning_tokens,
            "tier": "reported",
            "priced": cost.priced,
            "price_version": cost.price_version,
            "occurred_at": event.request_occurred_at,
            "usage_at": event.occurred_at,
            "outcome": event.outcome,
            "ttl_s": ttl,
        }
        if source is not None:
            common["source_partition"], common["source_offset"] = source
        budgets = self._budgets_of(
            event.budgets, event.request_model or event.model, event.provider, event.backend, event.metadata
        )
        return self._entries(common, budgets, event.request_id)

    def _count_usage(self, event: UsageEvent, cost: Cost) -> None:
        m = self.metrics
        label = self._model_label(event.model, event.backend, event.provider)
        m.child(m.cost, label, cost.backend).observe(pico_to_float_usd(cost.pico_usd))
        for kind, count in (
            ("input", event.input_tokens),
            ("cached", event.cached_input_tokens),
            ("output", event.output_tokens),
            ("reasoning", event.reasoning_tokens),
        ):
            if count:
                m.child(m.tokens, "reported", label, kind).inc(count)


def _lease_fields(lease: LeaseTag, budget: str) -> dict[str, Any]:
    """A reserve's lease fields for one budget: only for the budgets the router charged to a lease."""
    epoch = lease.epochs.get(budget)
    if epoch is None:
        return {}
    return {"lease_router": lease.router, "lease_epoch": epoch, "lease_pico": lease.pico}


def entry_json(common: dict[str, Any], budget: str) -> bytes:
    """A LedgerEntry's JSON for one budget, built without the model (a test holds it equal to the model's)."""
    return dumps(
        {
            "v": 1,
            "entry_id": entry_id(common["request_id"], common["attempt"], common["kind"], budget),
            "budget_id": budget,
            **common,
        }
    )
