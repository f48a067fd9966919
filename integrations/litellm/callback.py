"""The LiteLLM ``CustomLogger`` that puts a LiteLLM proxy under budgetflow's budgets (docs/litellm.md).

Per proxy request:

* ``async_pre_call_hook``: the request's budgets come from its key and team (:mod:`.budgets`); the BudgetView
  decides over the requested model group and, when the settings map it to one, its local model group. A request
  shifted to local is sent there with the cloud group as its (LiteLLM) fallback; a rejected one is a 429 that the
  OpenAI SDK does not retry (``x-should-retry: false``, ``Retry-After``, the budget in the body).
* ``async_pre_call_deployment_hook``: before a model group is first called for the request (the first choice or a
  fallback), its RequestEvent is published, one attempt per group, and a cloud one is admitted on the view. A cloud
  group the decision did not allow (a fallback configured in the proxy) is refused.
* ``async_log_success_event`` / ``async_log_failure_event``: the attempt's UsageEvent from the usage LiteLLM
  reports (streaming or not); a failed attempt settles at what the provider reported, 0 when nothing.
* ``async_post_call_response_headers_hook``: the ``X-Budget-*`` headers on the proxy's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from aiokafka.errors import KafkaError
from fastapi import HTTPException
from litellm import get_llm_provider
from litellm.exceptions import BadRequestError, Timeout
from litellm.integrations.custom_logger import CustomLogger

from budgetflow.integrations.litellm.budgets import BudgetsError, charged_budgets
from budgetflow.integrations.litellm.calls import (
    REQUEST_FIELD,
    Call,
    Calls,
    Failure,
    model_group,
    request_id_of,
    usage_of,
)
from budgetflow.schemas.errors import ConfigError, InvalidEvent
from budgetflow.schemas.events import MAX_TOKENS, Backend, RequestEvent
from budgetflow.schemas.money import format_usd
from budgetflow.schemas.serde import dumps, loads
from budgetflow.schemas.settings import Settings, load_settings
from budgetflow.streams.gateway.estimates import CostEstimates
from budgetflow.streams.gateway.publisher import BudgetPublisher, SpoolFull
from budgetflow.streams.gateway.routing import Candidate, Rejection
from budgetflow.streams.gateway.usage import Usage
from budgetflow.streams.gateway.view import BudgetView
from budgetflow.streams.kafka.retry import Backoff
from budgetflow.tokenizers import PriceTable

__all__ = ["BudgetflowCallback"]

log = logging.getLogger("budgetflow.litellm")
METERED = frozenset({"completion", "acompletion"})
SPOOL_SLOTS = 64


class BudgetflowCallback(CustomLogger):
    """budgetflow's hooks for a LiteLLM proxy; one per proxy worker process (it starts on the first request)."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self.settings = settings or load_settings()
        self.config = self.settings.litellm
        self.estimates = CostEstimates(self.settings)
        self.table = PriceTable.from_settings(self.settings.pricing)
        self.local_groups = {*self.config.local_models.values(), *self.config.local_model_groups}
        self.calls = Calls(self.config.call_ttl_s)
        self.publisher: BudgetPublisher | None = None
        self.view: BudgetView | None = None
        self._starting: asyncio.Lock | None = None
        self._candidates: dict[str, Candidate] = {}
        self._warming: asyncio.Task[Any] | None = None
        self._following: asyncio.Task[None] | None = None
        with contextlib.suppress(RuntimeError):  # made while the proxy loads its config: start connecting now
            self._warming = asyncio.get_running_loop().create_task(self.started(), name="budgetflow-start")

    # -- start ------------------------------------------------------------------------------
    async def started(self) -> tuple[BudgetPublisher, BudgetView]:
        """The publisher and the view of this process, started on first use (in the proxy's event loop).

        Neither needs the broker to start: the publisher spools usage until it is back, and the view follows the
        status topic from a background task that keeps trying; until the view has caught up (at most
        ``LITELLM__READY_TIMEOUT_S`` is waited for it here) its budgets read as ``VIEW__STALE_MODE`` says.
        """
        if self.publisher is not None and self.view is not None:
            return self.publisher, self.view
        self._starting = self._starting or asyncio.Lock()
        async with self._starting:
            if self.publisher is None or self.view is None:
                publisher = _publisher_with_own_spool(self.settings)
                await publisher.start()
                view = BudgetView(self.settings)
                self._following = asyncio.create_task(self._follow(view), name="budgetflow-view")
                try:
                    await asyncio.wait_for(view.ready(), self.config.ready_timeout_s)
                except TimeoutError:
                    log.warning("the budget view has not caught up; its budgets read as VIEW__STALE_MODE says")
                self.publisher, self.view = publisher, view
        return self.publisher, self.view

    async def _follow(self, view: BudgetView) -> None:
        """Start the view, again and again while the broker cannot be reached."""
        backoff = Backoff(1.0, 30.0)
        while True:
            try:
                await view.start()
                return
            except KafkaError as exc:
                log.warning("the budget view cannot reach the broker (%s); trying again", type(exc).__name__)
                await view.stop()
                await backoff.wait()

    async def stop(self) -> None:
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
        if self.publisher is not None:
            await self.publisher.stop()
        if self.view is not None:
            await self.view.stop()
        self.publisher = self.view = None

    # -- before the call ----------------------------------------------------------------------
    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: str
    ) -> Any:
        metadata = data.get("metadata")
        if isinstance(metadata, dict):
            metadata.pop(REQUEST_FIELD, None)  # only this hook names a request
        if call_type not in METERED:
            if call_type not in self.config.unmetered_calls and "*" not in self.config.unmetered_calls:
                raise HTTPException(status_code=400, detail=f"budgetflow does not meter {call_type} calls")
            return data
        data.pop("no-log", None)  # a caller may not turn off the usage that settles its own request
        _, view = await self.started()
        try:
            budgets = charged_budgets(user_api_key_dict)
        except BudgetsError as exc:
            log.error("request refused: %s", exc)
            raise HTTPException(status_code=500, detail=f"budgetflow: {exc}") from exc
        ask = self._ask(data)
        groups = [str(data.get("model") or "")]
        if (local := self.config.local_models.get(groups[0])) is not None:
            groups.append(local)
        candidates = [self._candidate(g) for g in groups]  # named as the price table and budget scopes name them
        group_of = {(c.name, c.backend): g for c, g in zip(candidates, groups, strict=True)}
        if not view.is_ready and self.settings.view.stale_mode == "closed":
            candidates = [c for c in candidates if c.backend == "local"]  # nothing known: no cloud spend
            if not candidates:
                raise HTTPException(
                    status_code=503,
                    detail="budgets are not known yet (the budget view has not caught up); retry shortly",
                    headers={"Retry-After": "5"},
                )
        request_id = f"ll-{uuid.uuid4().hex}"
        decision = view.decide(request_id, budgets, candidates)
        estimate = self.estimates.for_decision(ask, decision, candidates)
        if decision.rejection is not None:
            raise _refusal(decision.rejection, view.headers(budgets, estimate))
        chosen = [group_of[(c.name, c.backend)] for c in decision.candidates]
        data["model"] = chosen[0]
        data.pop("fallbacks", None)  # the decision's, not the caller's: a caller cannot add a cloud model
        if len(chosen) > 1:
            data["fallbacks"] = chosen[1:]
        data["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), REQUEST_FIELD: request_id}
        allowed = dict(zip(chosen, decision.candidates, strict=True))
        self.calls.add(Call(request_id, budgets, decision, ask, estimate, allowed))
        return data

    def _ask(self, data: Mapping[str, Any]) -> RequestEvent:
        """What the request asks (its prompt or only its size, as the settings say), checked; a bad one is a 400."""
        messages = data.get("messages")
        tools = data.get("tools")
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        n = data.get("n")
        try:
            if self.config.publish_prompts:
                return self.estimates.request(messages=messages, tools=tools, max_tokens=max_tokens, n=n)
            if not isinstance(messages, list) or not (tools is None or isinstance(tools, list)):
                raise TypeError("messages and tools must be lists")
            size = len(dumps(messages)) + (len(dumps(tools)) if tools else 0)
            return self.estimates.request(input_bytes=min(size, MAX_TOKENS), max_tokens=max_tokens, n=n)
        except (InvalidEvent, TypeError) as exc:
            raise HTTPException(status_code=400, detail=f"invalid request: {exc}") from exc

    def _candidate(self, group: str) -> Candidate:
        """A model group as a routing candidate, named by the model its deployment calls (an alias resolved)."""
        if (known := self._candidates.get(group)) is not None:
            return known
        backend: Backend = "local" if group in self.local_groups else "cloud"
        model, provider = self._deployment(_deployed_model(group), backend)
        priced = self.table.price(model, backend=backend, provider=provider).priced
        candidate = Candidate(model, backend, 1.0 if backend == "cloud" else 0.5, provider=provider, priced=priced)
        if len(self._candidates) < 4096:  # model groups are few; names a caller made up are not kept
            self._candidates[group] = candidate
        return candidate

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any] | None:
        call = self.calls.get(request_id_of(kwargs))
        group = model_group(kwargs)
        if call is None or group is None or group in call.attempts:
            return None  # not metered, or a retry of a group already published (one attempt per group)
        publisher, view = await self.started()
        candidate = call.allowed.get(group) or self._candidate(group)
        cloud_allowed = any(c.backend == "cloud" for c in call.allowed.values())
        if candidate.backend == "cloud" and group not in call.allowed and not cloud_allowed:
            # A cloud fallback of the proxy's own config (router_settings) for a request its budgets keep local.
            raise HTTPException(status_code=429, detail=f"budgetflow: {group} is not allowed for this request")
        model, provider = self._deployment(str(kwargs.get("model") or group), candidate.backend)
        ask = call.ask
        estimate = self.estimates.of(ask, candidate)
        lease = await view.lease(call.budgets, estimate) if candidate.backend == "cloud" else None
        if isinstance(lease, Rejection):  # no headroom leased for it in time: the budget's 429
            raise _refusal(lease, view.headers(call.budgets, estimate))
        handle = await publisher.publish_request(
            request_id=call.request_id,
            model=model,
            provider=provider,
            backend=candidate.backend,
            budgets=call.budgets,
            messages=None if ask.messages is None else [m.model_dump(exclude_none=True) for m in ask.messages],
            input_bytes=ask.input_bytes,
            tools=ask.tools,
            max_tokens=ask.max_tokens,
            max_completion_tokens=ask.max_completion_tokens,
            n=ask.n,
            attempt=len(call.attempts),
            lease=lease,
        )
        if candidate.backend == "cloud" and not handle.cloud_allowed:
            raise HTTPException(status_code=503, detail="budget accounting is unavailable; retry shortly")
        call.attempts[group] = handle
        call.served_by = candidate
        call.last_group = group
        if candidate.backend == "cloud":
            view.admit(call.budgets, estimate, request=handle)
        if len(call.attempts) > 1:
            view.fallback_taken(call.decision, candidate)
        return None

    def _deployment(self, deployed: str, backend: Backend) -> tuple[str, str]:
        """The model and provider a deployment calls (``openai/gpt-4o`` -> gpt-4o, openai), as the price table
        names them. The provider is always the real one: a hosted deployment in a group called local is priced as
        what it is (only PRICING__LOCAL_PROVIDERS are free)."""
        try:
            model, provider, _, _ = get_llm_provider(deployed)
        except (BadRequestError, ValueError):  # no provider LiteLLM knows: priced under the name as it is
            model, provider = deployed, "unknown"
        return str(model), str(provider)

    # -- after the call -------------------------------------------------------------------------
    # LiteLLM logs one success per request (the attempt that answered) and at most one failure, whatever the
    # retries and fallbacks before it: a failure is only noted, and every attempt of the request is settled when
    # it succeeds or when the proxy answers it with an error.
    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        call = self.calls.get(request_id_of(kwargs))
        group = model_group(kwargs)
        if call is None or group is None or group not in call.attempts:
            return
        # An answer from LiteLLM's cache called no model: nothing was spent.
        usage = Usage(0, 0) if kwargs.get("cache_hit") else _usage(call, response_obj, kwargs)
        await self._publish(call, group, usage, "completed")
        await self._settle_failed(call)

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        call = self.calls.get(request_id_of(kwargs))
        group = model_group(kwargs)
        if call is not None and group is not None and group in call.attempts:
            call.failures[group] = Failure(_usage(call, response_obj, kwargs), _timed_out(kwargs.get("exception")))

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: Any,
        traceback_str: str | None = None,
    ) -> None:
        call = self.calls.get(request_id_of(request_data))
        if call is None:
            return
        last = call.last_group
        if last is not None and last not in call.failures:
            call.failures[last] = Failure(Usage(0, 0), _timed_out(original_exception))
        await self._settle_failed(call)  # the error's headers come next: the call is forgotten once they are made

    async def _settle_failed(self, call: Call) -> None:
        """Settle every attempt of a finished request that has no usage yet as failed: at what its provider
        reported (0 when nothing); one that timed out is left to expire at its estimate, since the provider may
        have billed work it did."""
        for group in [g for g in call.attempts if g not in call.settled]:
            failure = call.failures.get(group, Failure(Usage(0, 0), timed_out=False))
            if failure.timed_out:
                call.settled.add(group)
                log.info("%s attempt %s timed out: its reservation expires at its estimate", call.request_id, group)
                continue
            await self._publish(call, group, failure.usage, "failed")

    async def _publish(self, call: Call, group: str, usage: Usage, outcome: Literal["completed", "failed"]) -> None:
        if group in call.settled or self.publisher is None:
            return
        try:
            await self.publisher.publish_usage(call.attempts[group], usage, outcome=outcome)
        except (SpoolFull, InvalidEvent) as exc:
            log.error("usage of %s (%s) not recorded: %s; its reservation expires", call.request_id, group, exc)
        call.settled.add(group)
        self.calls.done(call)

    async def async_post_call_response_headers_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: Any,
        response: Any,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, Any] | None = None,
    ) -> dict[str, str] | None:
        call = self.calls.get(request_id_of(data))
        if call is None or self.view is None:
            return None
        served = call.served_by
        estimate = self.estimates.of(call.ask, served) if served is not None else call.estimate_pico
        headers = {**self.view.headers(call.budgets, estimate), "X-Budgetflow-Request-Id": call.request_id}
        if served is not None and response is not None:
            headers["X-Budgetflow-Backend"] = served.backend
            headers["X-Budgetflow-Model"] = served.name
            if call.decision.is_fallback(served):
                headers["X-Budgetflow-Fallback"] = "true"
        headers.setdefault("X-Budget-Cost-Estimated", format_usd(estimate, 6))
        if response is None:  # the proxy answers an error: the request is over
            await self._settle_failed(call)
        call.answered = True
        self.calls.done(call)
        return headers


def _usage(call: Call, response: Any, kwargs: Mapping[str, Any]) -> Usage:
    try:
        return usage_of(response, kwargs)
    except InvalidEvent:
        log.warning("LiteLLM reported unreadable usage for %s; counted as 0", call.request_id)
        return Usage(0, 0)


def _timed_out(exc: object) -> bool:
    return isinstance(exc, Timeout | TimeoutError)


def _deployed_model(group: str) -> str:
    """The model a proxy model group's (first) deployment calls, from the proxy's router; the name itself when
    the proxy has no such group (its router not loaded yet, or a name LiteLLM resolves directly)."""
    try:
        from litellm.proxy import proxy_server

        router = proxy_server.llm_router
        deployments = router.get_model_list(model_name=group) if router is not None else None
        for deployment in deployments or ():
            model = (deployment.get("litellm_params") or {}).get("model")
            if isinstance(model, str) and model:
                return model
    except Exception:  # the proxy's internals moved: fall back to the name
        log.debug("no deployment found for %s", group, exc_info=True)
    return group


def _publisher_with_own_spool(settings: Settings) -> BudgetPublisher:
    """A publisher whose spool no other process holds: proxy workers take the first free slot, so one restarted
    after a crash sends what its predecessor left in it."""
    base = Path(settings.data_dir) / "spool-litellm"
    for slot in range(SPOOL_SLOTS):
        try:
            return BudgetPublisher(settings, spool_dir=base / str(slot))
        except ConfigError:
            continue
    raise ConfigError(f"all {SPOOL_SLOTS} usage spools under {base} are in use")


def _refusal(rejection: Rejection, budget_headers: dict[str, str]) -> HTTPException:
    """A budget's rejection as the proxy's HTTP error: its status, its body's error, and the X-Budget-* headers."""
    status, headers, body = rejection.to_response()
    headers = {**budget_headers, **headers}
    headers.pop("content-type", None)
    error = loads(body)["error"]
    return HTTPException(status_code=status, detail={"error": error.pop("message"), **error}, headers=headers)
