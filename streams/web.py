"""The aggregate's HTTP side: the stats API and the health check.

``GET /v1/budgets`` lists every budget's current status (from the status
topic, so whichever worker answers sees them all); ``GET /v1/budgets/{id}``
adds its request counts and last 12 months, which only the worker holding the
budget's partition has: another worker forwards the request to that one
(found through the partition's heartbeat). ``GET /healthz`` is ready once the
worker's partitions are restored and caught up. Amounts are decimal USD
strings; nothing here carries prompt text.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from budgetflow.schemas.money import usd_string
from budgetflow.schemas.serde import dumps
from budgetflow.streams.topics import partition_for

if TYPE_CHECKING:
    from budgetflow.streams.aggregate import AggregateWorker
    from budgetflow.streams.view import BudgetView

__all__ = ["bearer_guard", "state_json", "stats_app"]

log = logging.getLogger(__name__)
_FORWARDED = "X-Budgetflow-Forwarded"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(data), status=status, content_type="application/json")


def bearer_guard(token: str | None) -> Any:
    """Middleware: when a token is configured, every route but /healthz and /metrics requires it."""
    expected = f"Bearer {token}"

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        open_path = request.path in ("/healthz", "/metrics")
        if token and not open_path and not hmac.compare_digest(request.headers.get("Authorization", ""), expected):
            return _json({"error": "unauthorized"}, status=401)
        return await handler(request)

    return guard


def stats_app(worker: AggregateWorker, view: BudgetView) -> web.Application:
    """The aiohttp application the aggregate worker serves."""
    token = worker.settings.web.bearer_token
    app = web.Application(middlewares=[bearer_guard(token.get_secret_value() if token else None)])

    async def healthz(_: web.Request) -> web.Response:
        ready = worker.ready
        body = {"ready": ready, "partitions": sorted(worker.ledgers), "catching_up": sorted(worker.catching_up)}
        return _json(body, status=200 if ready else 503)

    async def budgets(_: web.Request) -> web.Response:
        rows = []
        for budget in sorted(view.budgets()):
            state = view.status(budget)
            rows.append(state_json(state))
        return _json({"budgets": rows})

    async def budget(request: web.Request) -> web.Response:
        budget_id = request.match_info["budget_id"]
        partition = partition_for(budget_id, worker.topics.ledger.partitions)
        ledger = worker.ledgers.get(partition)
        if ledger is None:
            if request.headers.get(_FORWARDED):
                return _json({"error": f"partition {partition} is not held here"}, status=503)
            owner = view.owner(partition)
            if owner is None:
                return _json({"error": f"no worker holds partition {partition} right now"}, status=503)
            return await _forward(owner, request, token.get_secret_value() if token else None)
        periods = sorted((p for (b, _), p in ledger.periods.items() if b == budget_id),
                         key=lambda p: p.period, reverse=True)[:12]  # fmt: skip
        state = view.status(budget_id)
        if not periods and not state.seen:
            return _json({"error": f"unknown budget {budget_id}"}, status=404)
        body = state_json(state)
        body["partition"] = partition
        body["periods"] = [
            {"period": p.period, "status": p.status, "spend_usd": usd_string(p.spend),
             "settled_usd": usd_string(p.settled), "reserved_usd": usd_string(p.reserved), "requests": p.requests,
             "settles": p.settles, "expired": p.expired, "adjusted": p.adjusted, "unpriced": p.unpriced}
            for p in periods
        ]  # fmt: skip
        current = next((p for p in periods if p.period == state.period), None)
        body["requests"] = current.requests if current else 0
        projection = worker.forecast(ledger, budget_id, state.period)
        body["projected_month_end_usd"] = usd_string(projection.month_end_pico)
        body["projected_hard_limit_at"] = (
            None
            if projection.hard_limit_at is None
            else datetime.fromtimestamp(projection.hard_limit_at, UTC).isoformat()
        )
        return _json(body)

    async def metrics(_: web.Request) -> web.Response:
        from budgetflow.streams.metrics import exposition

        return web.Response(body=exposition(worker.metrics.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})  # fmt: skip

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/budgets", budgets)
    app.router.add_get("/v1/budgets/{budget_id}", budget)
    return app


def state_json(state: Any) -> dict[str, Any]:
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


async def _forward(owner: str, request: web.Request, token: str | None) -> web.Response:
    headers = {_FORWARDED: "1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = owner.rstrip("/") + request.rel_url.path
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:  # noqa: SIM117
            async with session.get(url, headers=headers) as response:
                return web.Response(body=await response.read(), status=response.status,
                                    content_type="application/json")  # fmt: skip
    except aiohttp.ClientError as exc:
        log.warning("forwarding to %s failed: %s", owner, exc.__class__.__name__)
        return _json({"error": "the worker holding this budget did not answer"}, status=502)
