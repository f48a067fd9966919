"""A router's lease book, fed grants directly (no broker): asks before running dry, waits, refuses, epochs; and
`view serve`'s POST /v1/lease on it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web

from budgetflow.schemas.events import BudgetStatus, Heartbeat, LeaseAsk, LeaseGrant
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.settings import Settings
from budgetflow.streams.gateway.leasebook import LeaseBook
from budgetflow.streams.gateway.routing import Rejection
from budgetflow.streams.gateway.view import BudgetView
from budgetflow.streams.gateway.viewserver import view_app

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
CENT = 10**10


def grant(granted: int, *, epoch: int = 0, expires: datetime = NOW + timedelta(seconds=30)) -> LeaseGrant:
    return LeaseGrant(
        budget_id="cap:a",
        period="2026-11",
        router="gw1",
        epoch=epoch,
        granted_usd=granted,
        used_usd=0,
        expires_at=expires,
        asks=1,
        as_of=NOW,
    )


def book(sent: list[LeaseAsk], wait_ms: float = 200) -> LeaseBook:
    async def send(ask: LeaseAsk) -> None:
        sent.append(ask)

    return LeaseBook("gw1", send, ttl_s=30, margin_s=2, horizon_s=1, wait_ms=wait_ms, minimum_pico=CENT)


async def test_without_a_grant_a_request_waits_then_is_refused_and_the_router_has_asked() -> None:
    sent: list[LeaseAsk] = []
    leases = book(sent, wait_ms=50)
    assert await leases.take(["cap:a"], CENT, NOW) == "cap:a"
    assert [(a.budget_id, a.router) for a in sent] == [("cap:a", "gw1")]
    assert sent[0].amount_usd >= CENT
    assert (leases.waits, leases.refusals) >= (1, 1)


async def test_a_grant_that_arrives_while_waiting_admits_the_request() -> None:
    sent: list[LeaseAsk] = []
    leases = book(sent, wait_ms=5_000)
    asyncio.get_running_loop().call_later(0.05, leases.granted, grant(3 * CENT))
    tag = await leases.take(["cap:a"], CENT, NOW)
    assert not isinstance(tag, str)
    assert (tag.router, tag.pico, tag.epochs) == ("gw1", CENT, {"cap:a": 0})
    # Two more fit, the fourth does not (and waits in vain: nobody grants).
    assert not isinstance(await leases.take(["cap:a"], CENT, NOW), str)
    assert not isinstance(await leases.take(["cap:a"], CENT, NOW), str)
    leases.wait_s = 0.05
    assert await leases.take(["cap:a"], CENT, NOW) == "cap:a"


async def test_a_lease_is_not_used_past_its_expiry_less_the_margin_and_a_new_epoch_starts_afresh() -> None:
    sent: list[LeaseAsk] = []
    leases = book(sent, wait_ms=50)
    leases.granted(grant(10 * CENT, expires=NOW + timedelta(seconds=3)))
    assert not isinstance(await leases.take(["cap:a"], CENT, NOW), str)
    assert await leases.take(["cap:a"], CENT, NOW + timedelta(seconds=1.5)) == "cap:a"  # within the 2 s margin
    leases.granted(grant(CENT, epoch=1, expires=NOW + timedelta(seconds=60)))  # released, then granted anew
    tag = await leases.take(["cap:a"], CENT, NOW + timedelta(seconds=5))
    assert not isinstance(tag, str)
    assert tag.epochs == {"cap:a": 1}


async def test_a_burst_that_finds_no_lease_is_admitted_in_one_round_trip() -> None:
    """100 requests at once on a router with no lease yet (a cold start, or the first traffic of a budget): the
    asks are sized to what waits, so one round trip to the aggregate admits them all. Sized to one request
    ($0.01, the least: 10 of them), the rest waited for a second round trip, and were refused when it was slower
    than the lease wait (LiteLLM at concurrency 100: the first 429 before any admission)."""
    sent: list[LeaseAsk] = []
    loop = asyncio.get_running_loop()
    granted, answering = 0, True

    async def aggregate(ask: LeaseAsk) -> None:  # answers, a round trip later, only what was asked before it did
        sent.append(ask)
        if not answering:
            return

        def answer() -> None:
            nonlocal granted, answering
            granted, answering = granted + ask.amount_usd, False
            leases.granted(grant(granted, expires=NOW + timedelta(seconds=60)).model_copy(update={"asks": ask.ask}))

        loop.call_later(0.05, answer)

    leases = LeaseBook("gw1", aggregate, ttl_s=30, margin_s=2, horizon_s=1, wait_ms=2_000, minimum_pico=CENT)
    tags = await asyncio.gather(*(leases.take(["cap:a"], CENT // 10, NOW) for _ in range(100)))
    assert sum(isinstance(t, str) for t in tags) == 0
    assert len(sent) <= 10, [a.amount_usd for a in sent]


async def test_view_serve_answers_the_lease_tag_then_the_budgets_429_when_the_lease_is_spent() -> None:
    """POST /v1/lease, for gateways not in Python: the tag for the RequestEvent, null for a budget that is not
    leased, and the budget's 429 (at its hard limit) when the router's lease cannot cover the request."""
    view = BudgetView(Settings())
    block = {"monthly_limit_usd": "1", "hard_limit_action": "block_all"}
    policies = {
        "cap:a": BudgetPolicy.model_validate({"id": "cap:a", **block}),
        "team:warn": BudgetPolicy.model_validate({"id": "team:warn", "monthly_limit_usd": "1"}),
    }
    view.use_policies(lambda: policies)
    sent: list[LeaseAsk] = []
    view.lease_book = book(sent, wait_ms=20)
    now = datetime.now(UTC)
    view.lease_book.granted(grant(2 * CENT, expires=now + timedelta(seconds=60)))
    runner = web.AppRunner(view_app(view), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/lease"
    answers = []
    try:
        async with aiohttp.ClientSession() as http:
            for budgets in (["cap:a"], ["cap:a"], ["team:warn"], ["cap:a"]):
                body = {"budgets": budgets, "estimated_cost_usd": "0.01"}
                async with http.post(url, json=body) as response:
                    answers.append((response.status, await response.json()))
    finally:
        await runner.cleanup()
    assert [status for status, _ in answers] == [200, 200, 200, 429]
    assert answers[0][1]["lease"] == {"router": "gw1", "pico": CENT, "epochs": {"cap:a": 0}}
    assert answers[2][1] == {"lease": None}  # a warn budget is not leased
    assert answers[3][1]["error"]["budget_id"] == "cap:a"
    assert answers[3][1]["error"]["code"] == "budget_exceeded"
    assert [ask.budget_id for ask in sent][:1] == ["cap:a"], "the router asked for more as its lease ran low"


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_budget_whose_status_expired_is_not_leased_when_the_operator_chose_to_fail_open(mode: str) -> None:
    """The aggregate away for longer than VIEW__EXPIRE_AFTER_S, no grant coming: with VIEW__STALE_MODE=open the
    operator chose availability, so the request is not held to a lease (None: admitted as any other); closed, it
    waits for a grant that does not come and is refused."""
    settings = Settings.model_validate({"view": {"stale_mode": mode, "expire_after_s": 60, "lease_wait_ms": 20}})
    view = BudgetView(settings)
    policy = BudgetPolicy.model_validate({"id": "cap:a", "monthly_limit_usd": "1", "hard_limit_action": "block_all"})
    view.use_policies(lambda: {"cap:a": policy})
    view.lease_book = book([], wait_ms=20)
    last_heard = datetime.now(UTC) - timedelta(seconds=120)
    view.apply_status(
        BudgetStatus(
            budget_id="cap:a",
            period=f"{last_heard:%Y-%m}",
            status="normal",
            spend_usd=0,
            settled_usd=0,
            reserved_usd=0,
            limit_usd=10**12,
            remaining_usd=10**12,
            utilization_percent=0.0,
            soft_limit_percent=75,
            hard_limit_action="block_all",
            as_of=last_heard,
            next_reset=datetime(2100, 1, 1, tzinfo=UTC),
            reason="refresh",
            partition=0,
            seq=1,
        )
    )
    view.apply_heartbeat(Heartbeat(partition=0, as_of=last_heard, stream_time=last_heard, lag_s=0.0))
    got = await view.lease(["cap:a"], CENT)
    if mode == "open":
        assert got is None
    else:
        assert isinstance(got, Rejection)
