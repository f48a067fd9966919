"""`budgetflow view serve`: a BudgetView over HTTP, for gateways not written in Python.

``POST /v1/decide`` takes ``{"request_id", "budgets", "candidates": [{"name", "backend", "score",
"provider"?, "priced"?}], "session_id"?, "estimated_cost_usd"?, "provider"?, "metadata"?}`` and answers the
ordered candidates, the X-Budget-* headers and, when the request is rejected, the 429 (or 403) body a gateway
should return; each candidate says ``"fallback": true`` when it is to be used only if the ones before it fail.
``POST /v1/admit`` counts an admitted request; ``POST /v1/lease`` charges a cloud attempt to this router's leases
(the tag for its RequestEvent, or the 429); ``GET /v1/status/{id}`` is one budget as a router sees it.

An admission moves routing for every gateway using this view, so the server is strict about who may post:
``WEB__BEARER_TOKEN`` when set; bodies only as ``application/json`` (a web page can post ``text/plain`` across
origins without asking, not JSON); amounts at most ``MAX_ESTIMATE_USD`` per request; and, without a token, only
requests addressed to an IP address or ``localhost`` (a page whose name is rebound to 127.0.0.1 cannot).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import BudgetId, Metadata
from budgetflow.schemas.money import PICO_PER_USD, NonNegativeUsdAmount
from budgetflow.schemas.serde import loads, validation_message
from budgetflow.streams.gateway.routing import Candidate, Rejection, state_json
from budgetflow.streams.gateway.view import BudgetView
from budgetflow.streams.service.http import bearer_guard, json_response

__all__ = ["MAX_ESTIMATE_USD", "view_app"]

MAX_ESTIMATE_USD = 1000
"""The most one request's estimate may be (dollars): far above any single model call in the price table."""


def _bounded(pico: int) -> int:
    if pico > MAX_ESTIMATE_USD * PICO_PER_USD:
        raise ValueError(f"at most {MAX_ESTIMATE_USD} USD per request")
    return pico


Estimate = Annotated[NonNegativeUsdAmount, AfterValidator(_bounded)]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _CandidateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    backend: str = Field(pattern="^(cloud|local)$")
    score: float = 0.0
    provider: str | None = Field(None, min_length=1, max_length=64)
    priced: bool = True


class _DecideIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=256)
    budgets: list[BudgetId] = Field(default_factory=list, max_length=64)
    candidates: list[_CandidateIn] = Field(min_length=1, max_length=64)
    session_id: str | None = Field(None, max_length=256)
    estimated_cost_usd: Estimate | None = None
    provider: str | None = Field(None, min_length=1, max_length=64)
    metadata: Metadata = Field(default_factory=dict)


class _AdmitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budgets: list[BudgetId] = Field(default_factory=list, max_length=64)
    estimated_cost_usd: Estimate
    # Where the caller's request event went on the requests topic: the admission counts until a status covers it
    # (without them, until VIEW__ADMIT_MAX_AGE_S).
    request_partition: int | None = Field(None, ge=0)
    request_offset: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _both(self) -> _AdmitIn:
        if (self.request_partition is None) != (self.request_offset is None):
            raise ValueError("request_partition and request_offset go together")
        return self

    @property
    def source(self) -> tuple[int, int] | None:
        if self.request_partition is None or self.request_offset is None:
            return None
        return (self.request_partition, self.request_offset)


async def _parse(request: web.Request, model: type[BaseModel]) -> Any:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="the body must be application/json", content_type="text/plain")
    try:
        return model.model_validate(loads(await request.read()))
    except ValidationError as exc:
        raise web.HTTPBadRequest(text=validation_message(exc), content_type="text/plain") from exc
    except InvalidEvent as exc:
        raise web.HTTPBadRequest(text="the body is not valid JSON", content_type="text/plain") from exc


def _addressed_locally(host: str) -> bool:
    """Whether a Host header names an IP address or localhost, not a DNS name someone else controls."""
    try:
        name = urlsplit(f"//{host}").hostname
        if name is None or any(c in host for c in "/@?#"):
            return False
        if name == "localhost":
            return True
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@web.middleware
async def _local_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Without a token, refuse requests addressed by a DNS name (DNS rebinding: a page's own name at 127.0.0.1)."""
    if not _addressed_locally(request.headers.get("Host", "")):
        return json_response({"error": "addressed by name: set WEB__BEARER_TOKEN to serve other than localhost"}, 403)
    return await handler(request)


def _candidate_json(candidate: Candidate, fallback: bool) -> dict[str, Any]:
    return {"name": candidate.name, "backend": candidate.backend, "score": candidate.score, "fallback": fallback}


class _LeaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budgets: list[BudgetId] = Field(default_factory=list, max_length=64)
    estimated_cost_usd: Estimate


# The handlers of `view serve`, one per route, kept together with the routes they serve.
def view_app(view: BudgetView, token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[bearer_guard(token)] if token else [_local_only])

    async def decide(request: web.Request) -> web.Response:
        body: _DecideIn = await _parse(request, _DecideIn)
        candidates = [
            Candidate(c.name, c.backend, c.score, c.provider, c.priced)  # type: ignore[arg-type]
            for c in body.candidates
        ]
        decision = view.decide(
            body.request_id,
            body.budgets,
            candidates,
            session_id=body.session_id,
            provider=body.provider,
            metadata=body.metadata,
        )
        answer: dict[str, Any] = {
            "candidates": [_candidate_json(c, decision.is_fallback(c)) for c in decision.candidates],
            "cloud_allowed": decision.cloud_allowed,
            "cloud_share": decision.cloud_share,
            "affinity": decision.affinity,
            "flags": list(decision.flags),
            "headers": view.headers(body.budgets, body.estimated_cost_usd),
            "error": None,
        }
        if decision.rejection is not None:
            status, headers, payload = decision.rejection.to_response()
            answer["error"] = {"status": status, "headers": headers, "body": loads(payload)}
        return json_response(answer)

    async def admit(request: web.Request) -> web.Response:
        body: _AdmitIn = await _parse(request, _AdmitIn)
        view.admit(body.budgets, body.estimated_cost_usd, source=body.source)
        return web.Response(status=204)

    async def lease(request: web.Request) -> web.Response:
        """A cloud request charged to this router's leases: the ``lease`` to put on its RequestEvent (null when no
        budget of it is leased), or the budget's 429 when no lease covers it."""
        body: _LeaseIn = await _parse(request, _LeaseIn)
        got = await view.lease(body.budgets, body.estimated_cost_usd)
        if isinstance(got, Rejection):
            status, headers, payload = got.to_response()
            return web.Response(status=status, body=payload, headers=headers)
        return json_response({"lease": None if got is None else got.model_dump(mode="json")})

    async def status(request: web.Request) -> web.Response:
        return json_response(state_json(view.status(request.match_info["budget_id"])))

    async def healthz(_: web.Request) -> web.Response:
        snapshot = view.snapshot()
        return json_response(snapshot, status=200 if snapshot["ready"] else 503)

    app.router.add_post("/v1/decide", decide)
    app.router.add_post("/v1/admit", admit)
    app.router.add_post("/v1/lease", lease)
    app.router.add_get("/v1/status/{budget_id}", status)
    app.router.add_get("/healthz", healthz)
    return app
