"""An OpenAI-compatible gateway in front of a fake model backend, wired to budgetflow as a real one would be.

Run it next to the workers (same BUDGETFLOW_* settings)::

    python examples/gateway.py --port 8080
    curl -s localhost:8080/v1/chat/completions -H 'Authorization: Bearer sk-demo' \\
         -H 'X-Budget-Ids: team:search' -d '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'

Per request it: decides with the BudgetView (cloud, local, or a 429 that the
OpenAI and Anthropic SDKs do not retry), publishes the RequestEvent, admits
the estimate on the view when it goes to cloud, calls the model (here a fake
that answers deterministically and reports OpenAI-style usage), publishes the
UsageEvent, and answers with the X-Budget-* headers. The API key is never
published: its budget id is ``key:`` and the first 8 hex digits of its SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import time
import uuid
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import BUDGET_ID_PATTERN
from budgetflow.schemas.serde import dumps, loads
from budgetflow.schemas.settings import Settings, load_settings
from budgetflow.streams import BudgetPublisher, BudgetView, Candidate, from_openai
from budgetflow.streams.metrics import RouterCollector, exposition
from budgetflow.tokenizers import PriceTable, quick_estimate
from budgetflow.tokenizers.registry import utf8_len

log = logging.getLogger("example-gateway")
LOCAL_PROVIDER = "ollama"


def provider_of(model: str, backend: str) -> str:
    """Which provider serves a model (a real gateway knows it from its routing table)."""
    if backend == "local":
        return LOCAL_PROVIDER
    if model.startswith("claude"):
        return "anthropic"
    if model.startswith("gemini"):
        return "google"
    return "openai"


class FakeModel:
    """Answers like a chat model and reports usage the way OpenAI does (prompt, completion, details)."""

    def complete(self, model: str, messages: list[dict[str, Any]], max_tokens: int | None) -> dict[str, Any]:
        text = " ".join(str(m.get("content") or "") for m in messages)
        prompt_tokens = max(1, utf8_len(text) // 4) + 4 * len(messages)
        completion_tokens = min(max_tokens or 64, 64)
        return {
            "content": f"({model}) I read {prompt_tokens} tokens.",
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0}},
        }  # fmt: skip


def key_budget(authorization: str | None) -> str | None:
    """``key:<8 hex>`` for the caller's API key: a budget id that is not the secret."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    return "key:" + hashlib.sha256(authorization[7:].encode()).hexdigest()[:8]


class Gateway:
    def __init__(self, settings: Settings, publisher: BudgetPublisher, view: BudgetView, *, local_model: str) -> None:
        self.settings = settings
        self.publisher = publisher
        self.view = view
        self.local_model = local_model
        self.table = PriceTable.from_settings(settings.pricing)
        self.model = FakeModel()
        self.requests_seen = 0

    async def chat(self, request: web.Request) -> web.Response:
        self.requests_seen += 1
        try:
            body = loads(await request.read())
            model, messages = body["model"], body["messages"]
        except (InvalidEvent, KeyError, TypeError):
            return _error(400, "the body must be a chat completion request with model and messages")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        budgets = [b.strip() for b in request.headers.get("X-Budget-Ids", "").split(",") if b.strip()]
        if (key := key_budget(request.headers.get("Authorization"))) is not None:
            budgets.append(key)
        if any(not re.match(BUDGET_ID_PATTERN, b) for b in budgets):
            return _error(400, "X-Budget-Ids holds an invalid budget id")
        request_id = request.headers.get("X-Request-Id") or f"gw-{uuid.uuid4().hex}"
        session = request.headers.get("X-Session-Id")
        estimate = quick_estimate(self.table, model, input_bytes=len(dumps(messages)), max_output_tokens=max_tokens,
                                  provider=provider_of(model, "cloud"))  # fmt: skip
        provider = provider_of(model, "cloud")
        priced = self.table.price(model, provider=provider).priced
        local = Candidate(self.local_model, "local", 0.5, provider=provider_of(self.local_model, "local"))
        candidates = [Candidate(model, "cloud", 1.0, provider=provider, priced=priced), local]
        if request.headers.get("X-Local-Fallback", "yes") == "no":
            candidates = candidates[:1]
        decision = self.view.decide(request_id, budgets, candidates, session_id=session)
        headers = self.view.headers(budgets, estimate)
        if decision.error is not None:
            status, error_headers, payload = decision.error.to_response()
            return web.Response(status=status, body=payload, headers={**headers, **error_headers})
        chosen = decision.candidates[0]
        try:
            handle = await self.publisher.publish_request(
                request_id=request_id, model=chosen.name, provider=provider_of(chosen.name, chosen.backend),
                backend=chosen.backend, budgets=budgets, messages=messages, max_tokens=max_tokens, session_id=session,
            )  # fmt: skip
        except InvalidEvent as exc:
            return _error(400, f"invalid request: {exc}")
        if chosen.backend == "cloud" and not handle.cloud_allowed:
            # The publisher could not record it (broker away, buffer full): cloud spend would go unseen.
            local = [c for c in decision.candidates if c.backend == "local"] + [
                c for c in candidates if c.backend == "local"
            ]
            if not local:
                return _error(503, "budget accounting is unavailable; retry shortly", retry=True)
            chosen = local[0]
            handle = await self.publisher.publish_request(
                request_id=request_id, model=chosen.name, provider=LOCAL_PROVIDER, backend="local",
                budgets=budgets, messages=messages, max_tokens=max_tokens, session_id=session,
            )  # fmt: skip
        if chosen.backend == "cloud":
            self.view.admit(budgets, estimate)
        answer = self.model.complete(chosen.name, messages, max_tokens)
        await self.publisher.publish_usage(handle, from_openai(answer["usage"]))
        response = {
            "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": chosen.name, "usage": answer["usage"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer["content"]}}],
        }  # fmt: skip
        headers.update({"X-Budgetflow-Backend": chosen.backend, "X-Budgetflow-Model": chosen.name,
                        "X-Budgetflow-Period": f"{handle.occurred_at:%Y-%m}"})  # fmt: skip
        return web.Response(body=dumps(response), content_type="application/json", headers=headers)

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": self.view.is_ready, "requests_seen": self.requests_seen})


def _error(status: int, message: str, *, retry: bool = False) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return web.Response(status=status, body=dumps(body), content_type="application/json",
                        headers={"x-should-retry": "true" if retry else "false"})  # fmt: skip


async def make_app(settings: Settings, local_model: str) -> web.Application:
    publisher = BudgetPublisher(settings)
    await publisher.start()
    view = BudgetView(settings)
    await view.start()
    await view.ready(timeout_s=60)
    gateway = Gateway(settings, publisher, view, local_model=local_model)
    registry = CollectorRegistry()
    registry.register(RouterCollector(view, publisher, now=view.clock.now))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=exposition(registry), headers={"Content-Type": "text/plain; version=0.0.4"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", gateway.chat)
    app.router.add_get("/healthz", gateway.healthz)
    app.router.add_get("/metrics", metrics)

    async def close(_: web.Application) -> None:
        await publisher.stop()
        await view.stop()

    app.on_cleanup.append(close)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--local-model", default="llama3.1:8b")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s gateway: %(message)s")
    settings = load_settings()
    web.run_app(make_app(settings, args.local_model), host=args.host, port=args.port, access_log=None,
                print=log.info)  # fmt: skip


if __name__ == "__main__":
    main()
