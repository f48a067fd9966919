"""What a request will probably cost (its reservation), and what a finished call did cost.

Both are pure and deterministic: the same event, registry and price table give
the same pico-dollars on every worker and on every replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import NamedTuple

from budgetflow.schemas.events import MAX_TOKENS, Backend, RequestEvent, Tier, UsageEvent
from budgetflow.schemas.money import MAX_ENTRY_PICO, parse_usd
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import PricingSettings, ReservationSettings, Settings, TokenizerSettings
from budgetflow.tokenizers.pricing import Cost, PriceTable
from budgetflow.tokenizers.registry import (
    HEURISTIC,
    TokenCount,
    TokenizerRegistry,
    TokenizerRule,
    content_text,
    heuristic_tokens,
    tool_call_text,
    utf8_len,
)

__all__ = ["Estimate", "Estimator", "estimate_request", "price_usage", "quick_estimate"]

_TIER_RANK: dict[Tier, int] = {"exact": 0, "reported": 0, "approximate": 1, "heuristic": 2}


class Estimate(NamedTuple):
    """A request's reservation: tokens, how they were counted, and the reserved pico-dollars."""

    input_tokens: int
    output_tokens: int
    tier: Tier
    tokenizer: str
    pico_usd: int
    priced: bool
    backend: Backend
    price_version: str
    ttl_s: int


def _worse(a: Tier, b: Tier) -> Tier:
    return a if _TIER_RANK[a] >= _TIER_RANK[b] else b


def _fraction(text: str) -> Fraction:
    return Fraction(Decimal(text))


@dataclass(frozen=True)
class Estimator:
    """Reservation rules (from settings) bound to a registry and a price table."""

    registry: TokenizerRegistry
    table: PriceTable
    reservation: ReservationSettings = field(default_factory=ReservationSettings)
    tokenizers: TokenizerSettings = field(default_factory=TokenizerSettings)
    pricing: PricingSettings = field(default_factory=PricingSettings)

    @classmethod
    def from_settings(cls, settings: Settings) -> Estimator:
        """The estimator of a deployment: its tokenizer rules, its price table, its reservation rules (what enrich
        reserves and what a gateway's ``X-Budget-Cost-Estimated`` says)."""
        rules = [TokenizerRule(r.match, r.encoding, r.tier) for r in settings.tokenizers.rules]
        table = PriceTable.from_settings(settings.pricing)
        return cls(TokenizerRegistry.default(rules), table, settings.reservation, settings.tokenizers, settings.pricing)

    def margin(self, tier: Tier) -> Fraction:
        if tier == "approximate":
            return _fraction(self.reservation.margin_approximate)
        if tier == "heuristic":
            return _fraction(self.reservation.margin_heuristic)
        return _fraction(self.reservation.margin_exact)

    def input_tokens(self, event: RequestEvent) -> TokenCount:
        """Input tokens of a request: its messages or prompt, plus its tools."""
        model = event.model
        if event.input_bytes is not None:
            count = TokenCount(heuristic_tokens(event.input_bytes), "heuristic", HEURISTIC.name)
        elif self._too_long(event):
            count = TokenCount(heuristic_tokens(self._text_bytes(event)), "heuristic", HEURISTIC.name)
        elif event.messages is not None:
            count = self.registry.count_chat(model, event.messages)
        else:
            count = self.registry.count_text(model, event.prompt or "")
        if event.tools:
            tools = self.registry.count_text(model, dumps(event.tools).decode())
            tier = _worse(count.tier, "approximate" if tools.tier == "exact" else tools.tier)
            count = TokenCount(count.tokens + tools.tokens, tier, count.tokenizer)
        return count

    def _too_long(self, event: RequestEvent) -> bool:
        limit = self.tokenizers.max_prompt_bytes
        # Characters are at most 4 UTF-8 bytes: skip the exact count when it cannot matter.
        chars = len(event.prompt or "") + sum(
            len(content_text(m.content)[0]) + len(tool_call_text(m.tool_calls)) for m in event.messages or ()
        )
        return chars * 4 > limit and self._text_bytes(event) > limit

    @staticmethod
    def _text_bytes(event: RequestEvent) -> int:
        total = utf8_len(event.prompt or "")
        for message in event.messages or ():
            total += utf8_len(content_text(message.content)[0]) + utf8_len(tool_call_text(message.tool_calls))
        return total

    def estimate(self, event: RequestEvent) -> Estimate:
        """The reservation of a request (docs/architecture.md, "Reservations")."""
        price = self.table.price(event.model, backend=event.backend, provider=event.provider, at=event.occurred_at)
        count = self.input_tokens(event)
        requested = next(
            (v for v in (event.max_completion_tokens, event.max_tokens) if v is not None),
            self.reservation.default_output_tokens,
        )
        if price.max_output_tokens is not None:
            requested = min(requested, price.max_output_tokens)
        # A count a ledger entry can hold: n × max_tokens may pass it, and a reservation is only an estimate.
        output = min(requested * max(event.n or 1, 1), MAX_TOKENS)
        raw = count.tokens * price.input + output * max(price.output, price.reasoning)
        margin = self.margin(count.tier)
        reserved = -(-raw * margin.numerator // margin.denominator)  # ceiling: never reserve too little
        if not price.priced:
            # The fallback price is a guess: a request asking for a billion tokens must not reserve $75,000.
            reserved = min(reserved, parse_usd(self.reservation.max_unpriced_usd))
        reserved = min(reserved, MAX_ENTRY_PICO)
        return Estimate(
            input_tokens=count.tokens,
            output_tokens=output,
            tier=count.tier,
            tokenizer=count.tokenizer,
            pico_usd=reserved,
            priced=price.priced,
            backend=price.backend,
            price_version=price.version,
            ttl_s=price.reservation_ttl_s or self.reservation.ttl_s,
        )

    def price_usage(self, event: UsageEvent) -> Cost:
        """The actual cost of a finished (or failed, or cancelled) call, from its reported usage, at the price in
        force when its request happened; or the cost the provider reported, if its provider is trusted to."""
        if event.reported_cost_usd is not None and event.provider.lower() in self.trusted_cost_providers:
            return Cost(event.reported_cost_usd, True, event.backend, f"reported:{event.provider.lower()}")
        return self.table.cost(
            event.model,
            input_tokens=event.input_tokens,
            output_tokens=event.output_tokens,
            cached_input_tokens=event.cached_input_tokens,
            cache_write_input_tokens=event.cache_write_input_tokens,
            reasoning_tokens=event.reasoning_tokens,
            backend=event.backend,
            provider=event.provider,
            at=event.request_occurred_at,
        )

    @property
    def trusted_cost_providers(self) -> frozenset[str]:
        return frozenset(p.lower() for p in self.pricing.trust_reported_cost)


def estimate_request(
    event: RequestEvent,
    registry: TokenizerRegistry,
    table: PriceTable,
    reservation: ReservationSettings | None = None,
) -> Estimate:
    """The reservation of ``event`` (see :class:`Estimator` to reuse settings across calls)."""
    return Estimator(registry, table, reservation or ReservationSettings()).estimate(event)


def price_usage(event: UsageEvent, table: PriceTable) -> Cost:
    """The actual cost of a finished call (docs/architecture.md, "Prices")."""
    return Estimator(TokenizerRegistry([]), table).price_usage(event)


def quick_estimate(
    table: PriceTable,
    model: str,
    *,
    input_bytes: int,
    max_output_tokens: int | None = None,
    n: int = 1,
    backend: Backend = "cloud",
    provider: str | None = None,
    default_output_tokens: int = 1024,
) -> int:
    """A cheap reservation-like estimate in pico-dollars, for a gateway that does not tokenize.

    The byte heuristic on the input, plus the output budget capped by the model,
    at the output rate: what ``X-Budget-Cost-Estimated`` and ``view.admit`` need.
    """
    price = table.price(model, backend=backend, provider=provider)
    output = max_output_tokens if max_output_tokens is not None else default_output_tokens
    if price.max_output_tokens is not None:
        output = min(output, price.max_output_tokens)
    return heuristic_tokens(input_bytes) * price.input + output * max(n, 1) * max(price.output, price.reasoning)
