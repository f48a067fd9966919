"""A router's lease book, fed grants directly (no broker): asks before running dry, waits, refuses, epochs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from budgetflow.schemas.events import LeaseAsk, LeaseGrant
from budgetflow.streams.gateway.leasebook import LeaseBook

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
