"""An OpenAI-compatible gateway in front of a fake model backend, wired to budgetflow as a real one would be.

Run it next to the workers (same BUDGETFLOW_* settings)::

    python examples/gateway.py --port 8080 --keys examples/keys.yaml
    curl -s localhost:8080/v1/chat/completions -H 'Authorization: Bearer sk-demo' \\
         -d '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'

Who is charged is decided by the caller's credentials, never by what it says
about itself. The caller's API key must be in the key file (which holds only
SHA-256 hashes of the keys); its requests are charged to the budgets the file
lists for it, to the key's own budget (``key:`` and the first 8 hex digits of
the hash, so the key is never published) and to ``global``. ``X-Budget-Ids``
may only narrow the listed budgets (an empty header: none of them); a budget
not listed is a 403. Request ids are made here, one per HTTP request, so a
retry or a replay is charged again like the call it is; a caller's
``X-Client-Request-Id`` (or ``X-Request-Id``) is only a label echoed back.

Per request it: decides with the BudgetView (cloud, local, or a 429 that the
OpenAI and Anthropic SDKs do not retry), then for each candidate in order:
publishes the RequestEvent (one attempt each), admits the estimate on the view
when it goes to cloud, calls the model (here a fake that answers
deterministically and reports OpenAI-style usage); a model that fails gets a
``failed`` UsageEvent and the next candidate is tried (a cloud fallback taken
is reported with ``view.fallback_taken``). It publishes the UsageEvent and
answers with the X-Budget-* headers, ``X-Budget-Cost-Estimated`` on every
response: enrich's reservation of the model called (or refused).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import re
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from budgetflow.schemas.errors import ConfigError, InvalidEvent
from budgetflow.schemas.events import MAX_TOKENS, BudgetId, LeaseTag, RequestEvent
from budgetflow.schemas.money import format_usd
from budgetflow.schemas.serde import dumps, loads, validation_message
from budgetflow.schemas.settings import Settings, load_settings
from budgetflow.streams import BudgetPublisher, BudgetView, Candidate, RequestHandle, Usage, from_openai
from budgetflow.streams.gateway.estimates import CostEstimates
from budgetflow.streams.gateway.metrics import RouterCollector
from budgetflow.streams.gateway.routing import Rejection
from budgetflow.streams.service.http import credential_bytes
from budgetflow.streams.service.metrics import exposition
from budgetflow.tokenizers import PriceTable
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


class ModelUnavailable(Exception):
    """The model did not answer (a local server that is down)."""


class FakeModel:
    """Answers like a chat model and reports usage the way OpenAI does (prompt, completion, details).

    While ``local_down`` (a path) exists, its local models fail as a local server that is down would: how the tests
    and the demo show a shifted request falling back to cloud.
    """

    def __init__(self, local_down: Path | None = None) -> None:
        self.local_down = local_down

    def complete(
        self, model: str, backend: str, messages: list[dict[str, Any]], max_tokens: int | None
    ) -> dict[str, Any]:
        if backend == "local" and self.local_down is not None and self.local_down.exists():
            raise ModelUnavailable(model)
        text = " ".join(str(m.get("content") or "") for m in messages)
        prompt_tokens = max(1, utf8_len(text) // 4) + 4 * len(messages)
        completion_tokens = min(max_tokens or 64, 64)
        return {
            "content": f"({model}) I read {prompt_tokens} tokens.",
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        }


def _distinct(values: list[str]) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError("lists a budget twice")
    return values


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64)
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    budgets: Annotated[list[BudgetId], Field(max_length=64), AfterValidator(_distinct)] = []


class _KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    keys: list[_KeyEntry] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated API key: its name in the key file, its own budget, the budgets it may be charged to."""

    name: str
    key_budget: str
    budgets: tuple[str, ...]


class KeyMap:
    """The key file: which API keys may call the gateway and which budgets each one's requests are charged to."""

    def __init__(self, entries: list[_KeyEntry]) -> None:
        self._entries = [
            (bytes.fromhex(e.sha256), Caller(e.name, "key:" + e.sha256[:8], tuple(e.budgets))) for e in entries
        ]

    @classmethod
    def load(cls, path: Path) -> KeyMap:
        """Read and check a key file; a bad one raises :class:`ConfigError` with one line naming the entry."""
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the key file ({exc.__class__.__name__})") from exc
        try:
            parsed = _KeyFile.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{path}: {validation_message(exc)}") from exc
        hashes = [e.sha256 for e in parsed.keys]
        if len(set(hashes)) != len(hashes):
            raise ConfigError(f"{path}: a key is listed twice")
        return cls(list(parsed.keys))

    def caller(self, authorization: str | None) -> Caller | None:
        """The key file's entry for ``Authorization: Bearer <key>``, or None."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        # The header's bytes as sent (aiohttp decodes with surrogateescape), hashed, compared with every entry.
        digest = hashlib.sha256(credential_bytes(key.strip())).digest()
        found = None
        for stored, caller in self._entries:
            if hmac.compare_digest(stored, digest):
                found = caller
        return found


def charged_budgets(caller: Caller, header: str | None) -> list[str] | None:
    """The budgets a request is charged to: the key's listed budgets, narrowed by ``X-Budget-Ids`` if sent, and the
    key's own budget. None when the header names a budget the key may not be charged to."""
    if header is None:
        chosen = list(caller.budgets)
    else:
        asked = {b.strip() for b in header.split(",") if b.strip()}
        if not asked <= set(caller.budgets):
            return None
        chosen = [b for b in caller.budgets if b in asked]
    return [*chosen, caller.key_budget]


_LABEL = re.compile(r"^[\x21-\x7e]{1,128}$")


@dataclass(frozen=True, slots=True)
class _Call:
    """One understood request: who is charged, what it asks, and its estimate on each candidate."""

    request_id: str
    budgets: list[str]
    messages: list[Any]
    max_tokens: int | None
    session: str | None
    ask: RequestEvent
    echo: dict[str, str]


class Gateway:
    def __init__(
        self,
        settings: Settings,
        publisher: BudgetPublisher,
        view: BudgetView,
        *,
        local_model: str,
        keys: KeyMap,
        local_down: Path | None = None,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.view = view
        self.local_model = local_model
        self.keys = keys
        self.table = PriceTable.from_settings(settings.pricing)
        self.estimates = CostEstimates(settings)
        self.model = FakeModel(local_down)
        self.requests_seen = 0
        # Session ids are keyed with a secret of this process: a caller cannot pick one whose affinity hash keeps
        # it on cloud while its budget's share shrinks.
        self._session_key = secrets.token_bytes(32)

    async def chat(self, request: web.Request) -> web.Response:
        self.requests_seen += 1
        caller = self.keys.caller(request.headers.get("Authorization"))
        if caller is None:
            return _error(401, "invalid API key", code="invalid_api_key")
        try:
            body = loads(await request.read())
            model, messages = body["model"], body["messages"]
        except (InvalidEvent, KeyError, TypeError):
            return _error(400, "the body must be a chat completion request with model and messages")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(model, str) or not model or not isinstance(messages, list):
            return _error(400, "the body must be a chat completion request with model and messages")
        if max_tokens is not None and (type(max_tokens) is not int or not 0 < max_tokens <= MAX_TOKENS):
            return _error(400, f"max_tokens must be a whole number from 1 to {MAX_TOKENS}")
        request_id = f"gw-{uuid.uuid4().hex}"  # one per HTTP request: whatever the caller sends is only a label
        label = request.headers.get("X-Client-Request-Id") or request.headers.get("X-Request-Id") or ""
        echo = {"X-Request-Id": request_id, **({"X-Client-Request-Id": label} if _LABEL.match(label) else {})}
        try:
            ask = self.estimates.request(messages=messages, max_tokens=max_tokens, at=self.view.clock.now())
        except InvalidEvent as exc:
            return _error(400, f"invalid request: {exc}", headers=echo)
        provider = provider_of(model, "cloud")
        priced = self.table.price(model, provider=provider).priced
        local = Candidate(self.local_model, "local", 0.5, provider=provider_of(self.local_model, "local"))
        candidates = [Candidate(model, "cloud", 1.0, provider=provider, priced=priced), local]
        budgets = charged_budgets(caller, request.headers.get("X-Budget-Ids"))
        if budgets is None:
            refused = {**echo, **_estimated(self.estimates.of(ask, candidates[0]))}
            message = "X-Budget-Ids names a budget this API key may not be charged to"
            return _error(403, message, code="budget_not_allowed", headers=refused)
        if request.headers.get("X-Local-Fallback", "yes") == "no":
            candidates = candidates[:1]
        session = None
        if (asked := request.headers.get("X-Session-Id")) is not None:
            named = f"{caller.key_budget}\0{asked}".encode("utf-8", "surrogateescape")
            session = "s-" + hmac.new(self._session_key, named, hashlib.sha256).hexdigest()[:32]
        call = _Call(request_id, budgets, messages, max_tokens, session, ask, echo)
        return await self._route(call, candidates)

    async def _route(self, call: _Call, candidates: list[Candidate]) -> web.Response:
        """Decide, then call the candidates in order until one answers; a fallback taken is reported to the view."""
        decision = self.view.decide(call.request_id, call.budgets, candidates, session_id=call.session)
        estimate = self.estimates.for_decision(call.ask, decision, candidates)
        if decision.rejection is not None:
            status, error_headers, payload = decision.rejection.to_response()
            headers = {**self.view.headers(call.budgets, estimate), **call.echo, **error_headers}
            return web.Response(status=status, body=payload, headers=headers)
        attempt = 0
        refused: Rejection | None = None
        for chosen in decision.candidates:
            estimate = self.estimates.of(call.ask, chosen)
            lease = await self.view.lease(call.budgets, estimate) if chosen.backend == "cloud" else None
            if isinstance(lease, Rejection):
                refused = lease  # no headroom leased for it: the next candidate, or the 429
                continue
            handle = await self._publish(call, chosen, attempt, lease)
            if handle is None:
                continue  # cloud, and the publisher could not record it: spend nobody would count
            if chosen.backend == "cloud":
                self.view.admit(call.budgets, estimate, request=handle)
            try:
                answer = self.model.complete(chosen.name, chosen.backend, call.messages, call.max_tokens)
            except ModelUnavailable:
                await self.publisher.publish_usage(handle, Usage(0, 0), outcome="failed")  # settles it at 0
                attempt += 1
                continue
            self.view.fallback_taken(decision, chosen)
            await self.publisher.publish_usage(handle, from_openai(answer["usage"]))
            response = self._answer(call, chosen, answer, estimate, handle)
            if decision.is_fallback(chosen):
                response.headers["X-Budgetflow-Fallback"] = "true"
            return response
        headers = {**call.echo, **self.view.headers(call.budgets, estimate)}
        if refused is not None and not attempt:
            status, error_headers, payload = refused.to_response()
            return web.Response(status=status, body=payload, headers={**headers, **error_headers})
        if attempt:
            return _error(
                502, "no model could answer; retry shortly", retry=True, code="model_unavailable", headers=headers
            )
        return _error(503, "budget accounting is unavailable; retry shortly", retry=True, headers=headers)

    async def _publish(
        self, call: _Call, chosen: Candidate, attempt: int, lease: LeaseTag | None
    ) -> RequestHandle | None:
        """The RequestEvent of one attempt; None when it is a cloud one the publisher could not record."""
        handle = await self.publisher.publish_request(
            request_id=call.request_id,
            model=chosen.name,
            provider=provider_of(chosen.name, chosen.backend),
            backend=chosen.backend,
            budgets=call.budgets,
            messages=call.messages,
            max_tokens=call.max_tokens,
            session_id=call.session,
            attempt=attempt,
            lease=lease,
        )
        if chosen.backend == "cloud" and not handle.cloud_allowed:
            return None
        return handle

    def _answer(
        self, call: _Call, chosen: Candidate, answer: dict[str, Any], estimate: int, handle: RequestHandle
    ) -> web.Response:
        response = {
            "id": f"chatcmpl-{call.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chosen.name,
            "usage": answer["usage"],
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer["content"]}}
            ],
        }
        headers = {
            **self.view.headers(call.budgets, estimate),
            **call.echo,
            "X-Budgetflow-Backend": chosen.backend,
            "X-Budgetflow-Model": chosen.name,
            "X-Budgetflow-Period": f"{handle.occurred_at:%Y-%m}",
        }
        return web.Response(body=dumps(response), content_type="application/json", headers=headers)

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": self.view.is_ready, "requests_seen": self.requests_seen})


def _estimated(pico: int) -> dict[str, str]:
    return {"X-Budget-Cost-Estimated": format_usd(pico, 6)}


def _error(
    status: int, message: str, *, retry: bool = False, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return web.Response(
        status=status,
        body=dumps(body),
        content_type="application/json",
        # Refused before the request was understood: nothing was estimated, and the header says so (0).
        headers={**_estimated(0), **(headers or {}), "x-should-retry": "true" if retry else "false"},
    )


async def make_app(
    settings: Settings, local_model: str, keys: KeyMap, local_down: Path | None = None
) -> web.Application:
    publisher = BudgetPublisher(settings)
    await publisher.start()
    view = BudgetView(settings)
    await view.start()
    await view.ready(timeout_s=60)
    gateway = Gateway(settings, publisher, view, local_model=local_model, keys=keys, local_down=local_down)
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
    parser.add_argument(
        "--keys",
        type=Path,
        required=True,
        help="key file: the API keys (as SHA-256) and the budgets each is charged to",
    )
    parser.add_argument(
        "--local-down-file",
        type=Path,
        help="while this file exists, the fake local model fails (to show shifted requests falling back to cloud)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s gateway: %(message)s")
    try:
        keys = KeyMap.load(args.keys)
        settings = load_settings()
    except ConfigError as exc:
        sys.exit(f"gateway: {exc}")
    web.run_app(
        make_app(settings, args.local_model, keys, args.local_down_file),
        host=args.host,
        port=args.port,
        access_log=None,
        print=log.info,
    )


if __name__ == "__main__":
    main()
