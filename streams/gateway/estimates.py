"""``X-Budget-Cost-Estimated`` as enrich will reserve it, for the model a gateway actually calls.

A gateway builds one :class:`CostEstimates` from its settings, next to its BudgetView::

    estimates = CostEstimates(settings)
    ask = estimates.request(messages=messages, max_tokens=max_tokens, at=view.clock.now())
    decision = view.decide(request_id, budgets, candidates)
    estimate = estimates.for_decision(ask, decision, candidates)  # the model called, or the one refused

It holds the estimator enrich builds in its ``run`` (the tiered tokenizer with ``TOKENIZERS__RULES``, the price
table, the reservation rules), so the header, ``view.admit`` and the ledger's reservation agree: a request
shifted to a free local model is estimated at 0, its cloud fallback at the cloud model's price.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import RequestEvent
from budgetflow.schemas.serde import describe_validation_error
from budgetflow.schemas.settings import Settings, load_settings
from budgetflow.streams.gateway.routing import Candidate, Decision
from budgetflow.tokenizers import Estimator

__all__ = ["CostEstimates"]


class CostEstimates:
    """Pico-dollar estimates of a request on each candidate, by the estimator enrich uses."""

    def __init__(self, settings: Settings | None = None, *, estimator: Estimator | None = None) -> None:
        self.estimator = estimator or Estimator.from_settings(settings or load_settings())

    def request(
        self,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        prompt: str | None = None,
        input_bytes: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        n: int | None = None,
        provider: str | None = None,
        at: datetime | None = None,
    ) -> RequestEvent:
        """What the request asks, checked once (raises :class:`InvalidEvent` as the publisher would)."""
        data = {
            "request_id": "estimate",
            "occurred_at": at or datetime.now(UTC),
            "model": "-",  # each candidate's own, in of()
            "provider": provider or "-",
            "backend": "cloud",
            "messages": None if messages is None else [dict(m) for m in messages],
            "prompt": prompt,
            "input_bytes": input_bytes,
            "tools": None if tools is None else [dict(t) for t in tools],
            "max_tokens": max_tokens,
            "max_completion_tokens": max_completion_tokens,
            "n": n,
        }
        try:
            return RequestEvent.model_validate({k: v for k, v in data.items() if v is not None})
        except ValidationError as exc:
            raise InvalidEvent(*describe_validation_error(exc)) from exc

    def of(self, ask: RequestEvent, candidate: Candidate) -> int:
        """Pico-dollars enrich will reserve for ``ask`` sent to ``candidate`` (its model, backend and provider)."""
        event = ask.model_copy(
            update={
                "model": candidate.name,
                "backend": candidate.backend,
                "provider": candidate.provider or ask.provider,
            }
        )
        return self.estimator.estimate(event).pico_usd

    def for_decision(self, ask: RequestEvent, decision: Decision, offered: Sequence[Candidate]) -> int:
        """The estimate of the decision's first choice; of a rejected request, the best candidate refused."""
        if decision.candidates:
            return self.of(ask, decision.candidates[0])
        if not offered:
            return 0
        return self.of(ask, max(offered, key=lambda c: c.score))
