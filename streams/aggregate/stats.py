"""The aggregate's HTTP side: the stats API and the health check.

``GET /v1/budgets`` lists every budget's last published status (from the status
topic, so whichever worker answers sees them all); ``GET /v1/budgets/{id}``
is answered from the exact state of the worker holding the budget's partition
(its status fields, request counts and last 12 months): another worker
forwards the request there, but only to an origin listed in ``WEB__PEERS``
and with ``WEB__PEER_TOKEN``, never with the caller's token (the owner's URL
comes from a heartbeat, and whoever can write the heartbeats topic names it).
``GET /healthz`` is ready once the worker's partitions are restored and caught
up. Amounts are decimal USD strings; nothing here carries prompt text.

Neither listing answers as a router would past ``VIEW__EXPIRE_AFTER_S``
(``VIEW__STALE_MODE``): a budget with old news keeps its last status, flagged
``stale``, so two workers asked the same question give the same answer.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from budgetflow.schemas.events import BUDGET_ID_PATTERN
from budgetflow.schemas.money import usd_string
from budgetflow.schemas.periods import next_month_start
from budgetflow.streams.gateway.routing import BudgetState, state_json
from budgetflow.streams.kafka.topics import partition_for
from budgetflow.streams.rules.status import utilization_percent
from budgetflow.streams.service.http import FORWARDED, bearer_guard, json_response, peer_origin, worker_app

if TYPE_CHECKING:
    from budgetflow.streams.aggregate.ledger import PartitionLedger
    from budgetflow.streams.aggregate.records import PeriodState
    from budgetflow.streams.aggregate.worker import AggregateWorker
    from budgetflow.streams.gateway.view import BudgetView

__all__ = ["stats_app"]

log = logging.getLogger(__name__)


def stats_app(worker: AggregateWorker, view: BudgetView) -> web.Application:
    """The aiohttp application the aggregate worker serves."""
    web_settings = worker.settings.web
    token = web_settings.bearer_token.get_secret_value() if web_settings.bearer_token else None
    peer_token = web_settings.peer_token.get_secret_value() if web_settings.peer_token else None
    if token is not None and peer_token == token:
        log.warning("WEB__PEER_TOKEN is the stats API's own token: give the workers a token of their own")
    owners = _Owners(view, list(web_settings.peers), peer_token)

    def health() -> tuple[bool, dict[str, Any]]:
        ready = worker.ready
        return ready, {"ready": ready, "partitions": sorted(worker.ledgers), "catching_up": sorted(worker.catching_up)}

    app = worker_app(worker.metrics.registry, health, [bearer_guard(token, peer_token=peer_token)])

    async def budgets(_: web.Request) -> web.Response:
        return json_response({"budgets": [state_json(view.last_status(b)) for b in sorted(view.budgets())]})

    async def budget(request: web.Request) -> web.Response:
        budget_id = request.match_info["budget_id"]
        if not re.match(BUDGET_ID_PATTERN, budget_id):
            return json_response({"error": "unknown budget"}, status=404)
        partition = partition_for(budget_id, worker.topics.ledger.partitions)
        ledger = worker.ledgers.get(partition)
        if ledger is None:
            return await owners.ask(partition, budget_id, forwarded=bool(request.headers.get(FORWARDED)))
        return _held_budget(worker, view, ledger, budget_id)

    app.router.add_get("/v1/budgets", budgets)
    app.router.add_get("/v1/budgets/{budget_id}", budget)
    return app


class _Owners:
    """Asks the worker that holds a partition (named by its heartbeats), if it is a configured peer."""

    def __init__(self, view: BudgetView, peers: list[str], peer_token: str | None) -> None:
        self.view = view
        self.peers = peers
        self.peer_token = peer_token
        self.refused: set[str] = set()  # owners not in WEB__PEERS, logged once each

    async def ask(self, partition: int, budget_id: str, *, forwarded: bool) -> web.Response:
        """The owner's answer about a budget of a partition not held here (a forwarded request is not forwarded
        again)."""
        if forwarded:
            return json_response({"error": f"partition {partition} is not held here"}, status=503)
        owner = self.view.owner(partition)
        if owner is None:
            return json_response({"error": f"no worker holds partition {partition} right now"}, status=503)
        target = peer_origin(owner, self.peers)
        if target is None:
            if owner not in self.refused and len(self.refused) < 100:
                self.refused.add(owner)
                log.warning("partition %d is held by %s, which is not in WEB__PEERS: not forwarding", partition, owner)
            return json_response(
                {"error": f"partition {partition} is held by a worker that is not a configured peer"}, status=503
            )
        return await _forward(f"{target}/v1/budgets/{quote(budget_id, safe=':')}", self.peer_token)


def _held_budget(worker: AggregateWorker, view: BudgetView, ledger: PartitionLedger, budget_id: str) -> web.Response:
    """A budget of a partition this worker holds: its current status, its last 12 months, its forecast."""
    periods = sorted(
        (p for (b, _), p in ledger.periods.items() if b == budget_id), key=lambda p: p.period, reverse=True
    )[:12]
    if not periods and budget_id not in worker.policies.policies and not view.last_status(budget_id).seen:
        return json_response({"error": f"unknown budget {budget_id}"}, status=404)
    state = _owned_state(worker, ledger, budget_id)
    body = state_json(state)
    body["partition"] = ledger.partition
    body["periods"] = [_period_json(p) for p in periods]
    current = next((p for p in periods if p.period == state.period), None)
    body["requests"] = current.requests if current else 0
    projection = worker.forecasts.forecast(ledger, budget_id, state.period)
    body["projected_month_end_usd"] = usd_string(projection.month_end_pico)
    body["projected_hard_limit_at"] = (
        None if projection.hard_limit_at is None else datetime.fromtimestamp(projection.hard_limit_at, UTC).isoformat()
    )
    return json_response(body)


def _period_json(p: PeriodState) -> dict[str, Any]:
    return {
        "period": p.period,
        "status": p.status,
        "spend_usd": usd_string(p.spend),
        "settled_usd": usd_string(p.settled),
        "reserved_usd": usd_string(p.reserved),
        "requests": p.requests,
        "settles": p.settles,
        "expired": p.expired,
        "adjusted": p.adjusted,
        "unpriced": p.unpriced,
    }


def _owned_state(worker: AggregateWorker, ledger: PartitionLedger, budget_id: str) -> BudgetState:
    """A budget's current month from the exact state of the worker that holds it (not from the status topic).

    The same status, spend and limit the worker would publish now; ``stale`` while its partition is catching up.
    """
    period = worker.publisher.current_period(ledger)
    policy = worker.policies.policy_for(budget_id)
    state = ledger.period_state(budget_id, period)
    spend = state.spend if state is not None else 0
    status = state.status if state is not None else worker.publisher.rules.next_status("normal", 0, policy)
    limit = policy.monthly_limit_usd
    return BudgetState(
        budget_id=budget_id,
        period=period,
        status=status,
        spend_pico=spend,
        limit_pico=limit,
        utilization=utilization_percent(spend, limit),
        soft_limit_percent=policy.soft_limit_percent,
        hard_limit_action=policy.hard_limit_action,
        next_reset=next_month_start(period),
        stale=ledger.partition in worker.catching_up,
    )


async def _forward(url: str, peer_token: str | None) -> web.Response:
    """Ask a configured peer, with the peer credential (never the caller's), and pass its answer on."""
    headers = {FORWARDED: "1"}
    if peer_token:
        headers["Authorization"] = f"Bearer {peer_token}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:  # noqa: SIM117
            async with session.get(url, headers=headers, allow_redirects=False) as response:
                return web.Response(body=await response.read(), status=response.status, content_type="application/json")
    except aiohttp.ClientError as exc:
        log.warning("forwarding to a peer failed: %s", exc.__class__.__name__)
        return json_response({"error": "the worker holding this budget did not answer"}, status=502)
