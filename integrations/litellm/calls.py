"""What the LiteLLM hooks know of one proxy request between its hooks: who is charged, the decision, and each
attempt (a model group tried) with its published request event; and the usage LiteLLM reports, by our rule."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from budgetflow.schemas.events import RequestEvent
from budgetflow.streams.gateway.publisher import RequestHandle
from budgetflow.streams.gateway.routing import Candidate, Decision
from budgetflow.streams.gateway.usage import Usage, from_openai

__all__ = ["REQUEST_FIELD", "Call", "Calls", "Failure", "model_group", "request_id_of", "usage_of"]

# The key of the proxy request's metadata that carries budgetflow's request id from hook to hook. The pre-call
# hook always sets it (whatever a caller sent), and only ids this process made are ever looked up.
REQUEST_FIELD = "budgetflow_request_id"


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt as LiteLLM reported it: the usage its provider reported, and whether it timed out."""

    usage: Usage
    timed_out: bool


@dataclass(slots=True)
class Call:
    """One proxy request: its budgets and decision; per model group tried, the attempt published for it."""

    request_id: str
    budgets: list[str]
    decision: Decision
    ask: RequestEvent
    estimate_pico: int
    allowed: dict[str, Candidate]  # the model groups the decision allows, in order, as candidates
    started: float = field(default_factory=time.monotonic)
    attempts: dict[str, RequestHandle] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)
    failures: dict[str, Failure] = field(default_factory=dict)
    served_by: Candidate | None = None
    last_group: str | None = None
    answered: bool = False  # the proxy has asked for its response headers


class Calls:
    """The requests in flight in this process, by request id; one whose usage never came is forgotten after
    ``ttl_s``, or sooner when ``max_calls`` are held (the aggregate expires its reserve)."""

    def __init__(self, ttl_s: float, max_calls: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_calls = max_calls
        self._calls: OrderedDict[str, Call] = OrderedDict()

    def add(self, call: Call) -> None:
        horizon = time.monotonic() - self.ttl_s
        while self._calls and (
            len(self._calls) >= self.max_calls or next(iter(self._calls.values())).started < horizon
        ):
            self._calls.popitem(last=False)
        self._calls[call.request_id] = call

    def get(self, request_id: str | None) -> Call | None:
        return None if request_id is None else self._calls.get(request_id)

    def done(self, call: Call) -> None:
        """Forget a request once it is answered and every attempt it published has its usage (LiteLLM logs a
        call's success before or after the proxy answers it, so both hooks call this)."""
        if call.answered and call.settled >= set(call.attempts):
            self._calls.pop(call.request_id, None)

    def __len__(self) -> int:
        return len(self._calls)


def _metadata(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The request's metadata as LiteLLM passes it: top level before the call, under litellm_params after."""
    for holder in (kwargs, kwargs.get("litellm_params") or {}):
        for name in ("metadata", "litellm_metadata"):
            found = holder.get(name)
            if isinstance(found, Mapping) and (REQUEST_FIELD in found or "model_group" in found):
                return found
    return {}


def request_id_of(kwargs: Mapping[str, Any]) -> str | None:
    found = _metadata(kwargs).get(REQUEST_FIELD)
    return found if isinstance(found, str) else None


def model_group(kwargs: Mapping[str, Any]) -> str | None:
    """The model group an attempt calls (the proxy's model name; a fallback's own group)."""
    found = _metadata(kwargs).get("model_group")
    return found if isinstance(found, str) else None


def usage_of(response: Any, kwargs: Mapping[str, Any]) -> Usage:
    """The usage LiteLLM reports for a call, streaming or not: its response's usage (prompt, completion, cached and
    reasoning tokens; Anthropic's cache writes), else the standard logging payload's counts, else nothing (0)."""
    usage = getattr(response, "usage", None)
    if usage is None and isinstance(response, Mapping):
        usage = response.get("usage")
    if usage is not None:
        counted = from_openai(usage)
        written = getattr(usage, "cache_creation_input_tokens", None)
        if isinstance(usage, Mapping):
            written = usage.get("cache_creation_input_tokens")
        if isinstance(written, int) and not isinstance(written, bool) and 0 < written <= counted.input_tokens:
            return Usage(
                counted.input_tokens,
                counted.output_tokens,
                counted.cached_input_tokens,
                written,
                counted.reasoning_tokens,
            )
        return counted
    logged = kwargs.get("standard_logging_object")
    if isinstance(logged, Mapping):
        prompt, completion = logged.get("prompt_tokens"), logged.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            return Usage(prompt, completion)
    return Usage(0, 0)
