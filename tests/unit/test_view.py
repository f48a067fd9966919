"""BudgetView's rules, fed directly (no broker): highest seq wins, rollover on read, staleness, admissions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from budgetflow.schemas.events import BudgetStatus, Heartbeat
from budgetflow.schemas.settings import Settings
from budgetflow.streams.gateway.routing import Candidate
from budgetflow.streams.gateway.view import BudgetView

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
LIMIT = 100 * 10**12


def view(**view_settings: Any) -> BudgetView:
    return BudgetView(Settings(view=view_settings))  # type: ignore[arg-type]


def status(
    budget: str = "team:a",
    *,
    spend: int = 0,
    seq: int = 10,
    state: str = "normal",
    period: str = "2026-11",
    as_of: datetime = NOW,
    action: str = "block_cloud",
    partition: int = 0,
    covers: dict[int, int] | None = None,
    covers_usage: dict[int, int] | None = None,
) -> BudgetStatus:
    return BudgetStatus(
        budget_id=budget,
        period=period,
        status=state,
        spend_usd=spend,
        settled_usd=spend,  # type: ignore[arg-type]
        reserved_usd=0,
        limit_usd=LIMIT,
        remaining_usd=max(LIMIT - spend, 0),
        utilization_percent=spend * 100 / LIMIT,
        soft_limit_percent=75,
        hard_limit_action=action,  # type: ignore[arg-type]
        as_of=as_of,
        next_reset=datetime(2026, 12, 1, tzinfo=UTC),
        reason="threshold",
        partition=partition,
        seq=seq,
        covers=covers or {},
        covers_usage=covers_usage or {},
    )


def beat(partition: int = 0, as_of: datetime = NOW, lag_s: float = 0.0) -> Heartbeat:
    return Heartbeat(partition=partition, as_of=as_of, stream_time=as_of, lag_s=lag_s)


def test_never_seen_budgets_are_normal() -> None:
    state = view().status("team:new", now=NOW)
    assert (state.status, state.seen, state.period) == ("normal", False, "2026-11")


def test_an_older_seq_never_overwrites_a_newer_one() -> None:
    v = view()
    assert v.apply_status(status(spend=90 * 10**12, seq=20, state="soft_limit"))
    assert not v.apply_status(status(spend=10 * 10**12, seq=19))
    assert v.status("team:a", now=NOW).status == "soft_limit"
    assert v.apply_status(status(spend=10 * 10**12, seq=20))  # a tie: the later record wins
    assert v.status("team:a", now=NOW).spend_pico == 10 * 10**12


def test_rollover_on_read() -> None:
    v = view()
    v.apply_status(status(spend=LIMIT, state="hard_limit"))
    v.apply_heartbeat(beat())
    assert v.status("team:a", now=NOW).status == "hard_limit"
    december = v.status("team:a", now=datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC))
    assert (december.status, december.period, december.spend_pico) == ("normal", "2026-12", 0)
    assert december.next_reset == datetime(2027, 1, 1, tzinfo=UTC)


def test_stale_then_expired_open_and_closed() -> None:
    for mode, expired_status in (("open", "normal"), ("closed", "hard_limit")):
        v = view(stale_after_s=30, expire_after_s=300, stale_mode=mode)
        v.apply_status(status(spend=80 * 10**12, state="soft_limit"))
        v.apply_heartbeat(beat(as_of=NOW))
        assert not v.status("team:a", now=NOW + timedelta(seconds=10)).stale
        stale = v.status("team:a", now=NOW + timedelta(seconds=60))
        assert (stale.stale, stale.status) == (True, "soft_limit")
        expired = v.status("team:a", now=NOW + timedelta(seconds=400))
        assert (expired.stale, expired.status) == (True, expired_status)
        decision = v.decide("r", ["team:a"], [Candidate("gpt-4o", "cloud")], now=NOW + timedelta(seconds=400))
        assert "stale" in decision.flags
        if mode == "closed":
            assert decision.rejection is not None  # block_cloud and no local model


def test_lag_reported_by_the_heartbeat_makes_a_budget_stale() -> None:
    v = view(stale_after_s=30)
    v.apply_status(status())
    v.apply_heartbeat(beat(lag_s=45.0))
    assert v.status("team:a", now=NOW).stale


def test_admitted_spend_counts_until_a_status_covers_its_request_event() -> None:
    v = view()
    v.apply_status(status(spend=90 * 10**12, state="soft_limit", covers={3: 100}))
    v.apply_heartbeat(beat())
    v.admit(["team:a"], 11 * 10**12, now=NOW, source=(3, 120))
    assert v.status("team:a", now=NOW).status == "hard_limit"
    assert v.status("global", now=NOW).spend_pico == 11 * 10**12  # global is implied
    # Newer statuses that do not count the request event yet (an earlier offset, another partition) keep it
    # counted, however much later they were taken: no fixed grace.
    later = NOW + timedelta(seconds=30)
    v.apply_status(status(spend=91 * 10**12, seq=11, state="soft_limit", as_of=later, covers={3: 119, 5: 900}))
    assert v.status("team:a", now=later).spend_pico == 102 * 10**12
    # The status that covers its position includes it: counted once, not twice.
    v.apply_status(status(spend=99 * 10**12, seq=12, state="soft_limit", covers={3: 120}))
    assert v.status("team:a", now=NOW).spend_pico == 99 * 10**12
    assert v.status("team:a", now=NOW).status == "soft_limit"
    assert v.status("global", now=NOW).spend_pico == 11 * 10**12  # global's own status has not come yet


def test_an_admission_placed_after_its_status_arrived_stops_counting_at_once() -> None:
    # Traffic stopped: the status that counts the request event came before the broker's acknowledgement did.
    v = view()
    v.apply_heartbeat(beat())
    admission = v.admit(["team:a"], 20 * 10**12, now=NOW)
    v.apply_status(status(spend=95 * 10**12, state="soft_limit", covers={0: 7}))
    assert v.status("team:a", now=NOW).status == "hard_limit"  # its position is not known yet: still counted
    v.admissions.placed(admission, (0, 7))
    assert v.status("team:a", now=NOW).spend_pico == 95 * 10**12


async def test_an_admission_learns_its_position_from_the_publishers_handle() -> None:
    import asyncio

    from budgetflow.streams.gateway.publisher import RequestHandle

    v = view()
    v.apply_heartbeat(beat())
    v.apply_status(status(spend=95 * 10**12, state="soft_limit", covers={2: 40}))
    delivery: asyncio.Future[tuple[int, int] | None] = asyncio.get_running_loop().create_future()
    handle = RequestHandle("r", 0, NOW, ("team:a",), "gpt-4o", "openai", "cloud", delivery=delivery)
    v.admit(["team:a"], 20 * 10**12, now=NOW, request=handle)
    assert v.status("team:a", now=NOW).spend_pico == 115 * 10**12
    delivery.set_result((2, 40))
    await asyncio.sleep(0)  # the future's callbacks run on the loop
    assert v.status("team:a", now=NOW).spend_pico == 95 * 10**12


def test_a_status_that_counts_the_usage_before_the_reserve_covers_the_admission() -> None:
    # The settle reached the ledger first: the status counts the request's cost, not its request event yet.
    v = view()
    v.apply_heartbeat(beat())
    admission = v.admit(["team:a"], 20 * 10**12, now=NOW, source=(0, 7))
    v.admissions.placed(admission, (4, 30), usage=True)
    v.apply_status(status(spend=95 * 10**12, state="soft_limit", covers={0: 6}, covers_usage={4: 29}))
    assert v.status("team:a", now=NOW).spend_pico == 115 * 10**12
    v.apply_status(status(spend=95 * 10**12, seq=11, state="soft_limit", covers={0: 6}, covers_usage={4: 30}))
    assert v.status("team:a", now=NOW).spend_pico == 95 * 10**12


def test_an_admission_never_placed_is_forgotten_after_its_max_age() -> None:
    v = view(admit_max_age_s=60)
    v.apply_heartbeat(beat())
    v.apply_status(status(spend=95 * 10**12, state="soft_limit", covers={0: 10**6}))
    v.admit(["team:a"], 20 * 10**12, now=NOW)  # its request event never reached the broker
    assert v.status("team:a", now=NOW + timedelta(seconds=59)).status == "hard_limit"
    v.apply_heartbeat(beat(as_of=NOW + timedelta(seconds=61)))
    assert v.status("team:a", now=NOW + timedelta(seconds=61)).status == "soft_limit"


def test_last_months_admissions_do_not_count_in_the_new_month() -> None:
    v = view(admit_max_age_s=3600)
    v.admit(["team:a"], 20 * 10**12, now=datetime(2026, 11, 30, 23, 59, 50, tzinfo=UTC))
    assert v.status("team:a", now=datetime(2026, 11, 30, 23, 59, 55, tzinfo=UTC)).spend_pico == 20 * 10**12
    assert v.status("team:a", now=datetime(2026, 12, 1, 0, 0, 5, tzinfo=UTC)).spend_pico == 0


def test_decide_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    v = view()

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(v, "status", broken)
    decision = v.decide("r", ["team:a"], [Candidate("gpt-4o", "cloud")])
    assert decision.rejection is None
    assert "decision_error" in decision.flags


def test_headers_name_the_deciding_budget() -> None:
    v = view()
    v.apply_status(status("team:a", spend=80 * 10**12, state="soft_limit"))
    v.apply_heartbeat(beat())
    headers = v.headers(["team:a"], 5 * 10**9, now=NOW)
    assert headers["X-Budget-Id"] == "team:a"
    assert headers["X-Budget-Cost-Estimated"] == "0.005000"


def test_scoped_and_parent_budgets_bind_the_candidates_they_charge() -> None:
    from budgetflow.schemas.policy import parse_policy_file

    policies = {
        p.id: p
        for p in parse_policy_file(
            {
                "budgets": [
                    {"id": "models:big", "applies_to": {"model": "big-*"}, "hard_limit_action": "block_cloud"},
                    {"id": "team:a", "parent": "org:eng"},
                    {"id": "org:eng", "hard_limit_action": "block_all"},
                    {"id": "team:b"},
                ]
            }
        ).budgets
    }
    v = view()
    v.use_policies(lambda: policies)
    v.apply_heartbeat(beat())
    v.apply_status(status("models:big", spend=LIMIT, state="hard_limit", action="block_cloud"))
    big, small, local = Candidate("big-1", "cloud", 3), Candidate("small-1", "cloud", 2), Candidate("llama", "local")
    decision = v.decide("r1", ["team:b"], [big, small, local], now=NOW)
    # The model cap is full: its model's cloud calls stop; the other cloud model and the local one go on.
    assert [c.name for c in decision.candidates] == ["small-1", "llama"]
    assert decision.ok
    assert decision.cloud_allowed
    # Only the capped model offered: shifted to local, or refused when there is none.
    assert [c.name for c in v.decide("r2", ["team:b"], [big, local], now=NOW).candidates] == ["llama"]
    assert v.decide("r3", ["team:b"], [big], now=NOW).rejection is not None
    # A parent at its hard limit binds every child: team:a's requests are refused, team:b's are not.
    v.apply_status(status("org:eng", spend=LIMIT, state="hard_limit", action="block_all", seq=11))
    refused = v.decide("r4", ["team:a"], [small, local], now=NOW)
    assert refused.rejection is not None
    assert refused.rejection.budget_id == "org:eng"
    assert v.decide("r5", ["team:b"], [small, local], now=NOW).ok


def test_a_budget_that_blocks_unpriced_models_refuses_them_for_cloud() -> None:
    from budgetflow.schemas.policy import parse_policy_file

    policies = {
        p.id: p
        for p in parse_policy_file(
            {"budgets": [{"id": "team:strict", "unpriced": "block"}, {"id": "team:easy"}]}
        ).budgets
    }
    v = view()
    v.use_policies(lambda: policies)
    mystery, known = Candidate("mystery-1", "cloud", 2, priced=False), Candidate("gpt-4o", "cloud", 1)
    assert [c.name for c in v.decide("r1", ["team:easy"], [mystery, known], now=NOW).candidates] == [
        "mystery-1",
        "gpt-4o",
    ]
    strict = v.decide("r2", ["team:strict"], [mystery, known], now=NOW)
    assert [c.name for c in strict.candidates] == ["gpt-4o"]
    assert "unpriced_refused" in strict.flags
    refused = v.decide("r3", ["team:strict"], [mystery], now=NOW)
    assert refused.rejection is not None
    assert refused.rejection.http_status == 403
    assert "mystery-1" in refused.rejection.message


def test_a_fallback_taken_is_counted_only_when_it_is_one() -> None:
    from prometheus_client import CollectorRegistry

    from budgetflow.streams.gateway.metrics import RouterCollector
    from budgetflow.streams.service.metrics import exposition

    v = view()
    v.apply_status(status("team:a", spend=99 * 10**12, state="soft_limit", action="warn"))
    v.apply_heartbeat(beat())
    cloud, local = Candidate("gpt-4o", "cloud", 1.0), Candidate("llama", "local", 0.5)
    decisions = [v.decide(f"r-{i}", ["team:a"], [cloud, local], now=NOW) for i in range(20)]
    shifted = next(d for d in decisions if not d.cloud_allowed)
    kept = next(d for d in decisions if d.cloud_allowed) if any(d.cloud_allowed for d in decisions) else None
    assert shifted.candidates == (local, cloud)
    v.fallback_taken(shifted, local)  # the first choice: not a fallback
    if kept is not None:
        v.fallback_taken(kept, cloud)
    assert v.fallbacks_taken == 0
    v.fallback_taken(shifted, cloud)
    assert v.fallbacks_taken == 1
    registry = CollectorRegistry()
    registry.register(RouterCollector(v, now=lambda: NOW))
    assert "budgetflow_router_fallbacks_total 1.0" in exposition(registry).decode()


def test_a_budget_with_a_policy_and_no_status_yet_is_held_to_its_limit() -> None:
    # Right after `policy apply`, before the aggregate's first status: a router must not admit without the limit.
    from budgetflow.schemas.policy import BudgetPolicy

    policies = {
        "cap:a": BudgetPolicy(id="cap:a", monthly_limit_usd="1", hard_limit_action="block_all"),  # type: ignore[arg-type]
        "cap:zero": BudgetPolicy(id="cap:zero", monthly_limit_usd="0", hard_limit_action="block_all"),  # type: ignore[arg-type]
    }
    v = view()
    v.use_policies(lambda: policies)
    cloud = [Candidate("gpt-4o", "cloud")]
    assert v.status("cap:a", now=NOW).limit_pico == 10**12
    assert v.decide("r1", ["cap:a"], cloud, now=NOW).rejection is None
    v.admit(["cap:a"], 10**12, now=NOW, source=(0, 1))
    assert v.decide("r2", ["cap:a"], cloud, now=NOW).rejection is not None  # its own admissions reached the limit
    assert v.decide("r3", ["cap:zero"], cloud, now=NOW).rejection is not None  # nothing may be spent
    assert v.status("team:none", now=NOW).limit_pico is None  # no policy: unlimited, as before
