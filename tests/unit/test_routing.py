"""Routing: the affinity hash (published vectors), the cloud share, decisions, rejections and headers."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from budgetflow.streams.gateway.routing import BudgetState, Candidate, affinity, cloud_share, decide, headers_for

# Published in docs/architecture.md ("The routing rule") for gateways in other languages.
VECTORS = [
    ("request-0001", "c78de4e5dea7d4d0", 0.7795088826375428),
    ("session:alice", "e7966db1f3aa245e", 0.9046391066982912),
    ("req-42", "fd1180d9f0c0819f", 0.988548329551806),
    ("", "e3b0c44298fc1c14", 0.8894159948913374),
    ("Grüße", "f83e039796c6453a", 0.9696962590303652),
]
CLOUD = Candidate("gpt-4o", "cloud", 1.0)
LOCAL = Candidate("llama3.1:8b", "local", 0.5)
RESET = datetime(2026, 12, 1, tzinfo=UTC)


def state(
    budget: str = "team:a",
    u: float | None = 0.0,
    status: str = "normal",
    action: str = "warn",
    soft: int = 75,
    limit: int | None = 100 * 10**12,
) -> BudgetState:
    spend = 0 if u is None or limit is None else int(limit * u / 100)
    return BudgetState(budget, "2026-11", status, spend, limit, u, soft, action, RESET)  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "prefix", "h"), VECTORS)
def test_affinity_vectors(key: str, prefix: str, h: float) -> None:
    digest = hashlib.sha256(key.encode()).digest()
    assert digest[:8].hex() == prefix
    assert affinity(key) == int(prefix, 16) / 2**64 == h


@pytest.mark.parametrize(
    ("u", "soft", "share"),
    [
        (None, 75, 1.0),
        (0, 75, 1.0),
        (74.99, 75, 1.0),
        (75, 75, 1.0),
        (80, 75, 0.8),
        (90, 75, 0.4),
        (99, 75, 0.04),
        (100, 75, 0.0),
        (250, 75, 0.0),
        (60, 50, 0.8),
    ],
)
def test_cloud_share_rule(u: float | None, soft: int, share: float) -> None:
    assert cloud_share(u, soft) == pytest.approx(share)


def test_hard_status_has_no_share_even_in_the_hysteresis_band() -> None:
    assert cloud_share(99.5, 75, "hard_limit") == 0.0


@pytest.mark.parametrize("u", [80.0, 90.0, 99.0])
def test_soft_share_over_10000_requests_follows_the_rule(u: float) -> None:
    states = [state(u=u, status="soft_limit")]
    cloud = sum(decide(f"r-{i}", states, [CLOUD, LOCAL]).cloud_allowed for i in range(10_000))
    assert abs(cloud / 100 - (100 - u) / 25 * 100) <= 2.0


def test_normal_keeps_every_candidate_in_score_order() -> None:
    decision = decide("r", [state()], [LOCAL, CLOUD])
    assert decision.candidates == (CLOUD, LOCAL)
    assert decision.rejection is None
    assert decision.cloud_allowed


def test_a_session_stays_on_one_side() -> None:
    states = [state(u=90.0, status="soft_limit")]
    sides = {decide(f"r-{i}", states, [CLOUD, LOCAL], session_id="s-1").cloud_allowed for i in range(200)}
    assert len(sides) == 1


@pytest.mark.parametrize(
    ("action", "local", "outcome"),
    [
        ("warn", True, "local_then_cloud"),
        ("warn", False, "cloud_flagged"),
        ("block_cloud", True, "local"),
        ("block_cloud", False, "rejected"),
        ("block_all", True, "rejected"),
        ("block_all", False, "rejected"),
    ],
)
def test_hard_limit_per_action(action: str, local: bool, outcome: str) -> None:
    candidates = [CLOUD, LOCAL] if local else [CLOUD]
    decision = decide("r", [state(u=100.0, status="hard_limit", action=action)], candidates)
    if outcome == "local_then_cloud":
        assert decision.candidates == (LOCAL, CLOUD)
        assert decision.fallbacks == (CLOUD,)
        assert decision.rejection is None
    elif outcome == "local":
        assert decision.candidates == (LOCAL,)
        assert decision.fallbacks == ()
        assert decision.rejection is None
    elif outcome == "cloud_flagged":
        assert decision.candidates == (CLOUD,)
        assert "over_budget_kept_cloud" in decision.flags
    else:
        assert decision.candidates == ()
        assert decision.rejection is not None
        assert decision.rejection.budget_id == "team:a"


@pytest.mark.parametrize("u", [80.0, 90.0, 99.0])
def test_a_shifted_request_goes_local_first_and_keeps_cloud_as_its_fallback(u: float) -> None:
    states = [state(u=u, status="soft_limit")]
    decisions = [decide(f"r-{i}", states, [CLOUD, LOCAL]) for i in range(10_000)]
    shifted = [d for d in decisions if not d.cloud_allowed]
    assert shifted
    assert all(d.candidates == (LOCAL, CLOUD) and d.fallbacks == (CLOUD,) for d in shifted)
    assert all(d.is_fallback(CLOUD) and not d.is_fallback(LOCAL) for d in shifted)
    # The first choice still follows the share: the measured shift is what it was.
    first_cloud = sum(d.candidates[0].backend == "cloud" for d in decisions)
    assert abs(first_cloud / 100 - (100 - u) / 25 * 100) <= 2.0
    assert all(d.fallbacks == () for d in decisions if d.cloud_allowed)


def test_block_cloud_at_the_hard_limit_never_offers_cloud() -> None:
    states = [state(u=100.0, status="hard_limit", action="block_cloud")]
    decisions = [decide(f"r-{i}", states, [CLOUD, LOCAL], session_id=f"s-{i}") for i in range(200)]
    assert all(d.candidates == (LOCAL,) and d.fallbacks == () for d in decisions)
    # A soft budget beside it does not bring cloud back.
    both = [state("team:b", u=90.0, status="soft_limit"), *states]
    assert all(CLOUD not in decide(f"r-{i}", both, [CLOUD, LOCAL]).candidates for i in range(200))


def test_merged_groups_put_the_fallbacks_last() -> None:
    from budgetflow.streams.gateway.routing import merge_decisions

    other = Candidate("claude", "cloud", 0.9)
    soft = [state(u=99.0, status="soft_limit")]
    shifted = next(d for d in (decide(f"r-{i}", soft, [CLOUD, LOCAL]) for i in range(100)) if not d.cloud_allowed)
    normal = decide("r", [state("team:b")], [other])
    merged = merge_decisions([shifted, normal], [CLOUD, other, LOCAL])
    assert merged.candidates == (other, LOCAL, CLOUD)
    assert merged.fallbacks == (CLOUD,)
    assert merged.cloud_allowed


def test_soft_limit_without_local_keeps_cloud_flagged() -> None:
    states = [state(u=99.0, status="soft_limit")]
    decisions = [decide(f"r-{i}", states, [CLOUD]) for i in range(100)]
    assert all(d.candidates == (CLOUD,) and d.rejection is None for d in decisions)
    assert any("soft_limit_kept_cloud" in d.flags for d in decisions)


def test_several_budgets_take_the_minimum_share_and_the_strictest_block() -> None:
    states = [state("team:a", 80.0, "soft_limit"), state("global", 95.0, "soft_limit"), state("key:1", 10.0)]
    cloud = sum(decide(f"r-{i}", states, [CLOUD, LOCAL]).cloud_allowed for i in range(10_000))
    assert abs(cloud / 100 - 20.0) <= 2.0  # global's share, (100 - 95) / 25
    blocked = [state("team:a", 100.0, "hard_limit", "block_cloud"), state("global", 100.0, "hard_limit", "block_all")]
    decision = decide("r", blocked, [CLOUD, LOCAL])
    assert decision.rejection is not None
    assert decision.rejection.budget_id == "global"


def test_rejection_is_an_openai_style_429_that_sdks_do_not_retry() -> None:
    decision = decide("r", [state(u=120.0, status="hard_limit", action="block_all")], [CLOUD])
    assert decision.rejection is not None
    status, headers, body = decision.rejection.to_response()
    assert status == 429
    assert headers["x-should-retry"] == "false"
    assert int(headers["retry-after"]) >= 1
    assert headers["X-Budget-Status"] == "hard_limit"
    assert headers["X-Budget-Id"] == "team:a"
    error = json.loads(body)["error"]
    assert error["code"] == "budget_exceeded"
    assert error["budget_id"] == "team:a"
    assert error["resets_at"] == "2026-12-01T00:00:00+00:00"


def test_headers() -> None:
    assert headers_for(state(), 1_234_567) == {"X-Budget-Cost-Estimated": "0.000001"}
    soft = headers_for(state(u=82.346, status="soft_limit"), 2_500_000_000)
    assert soft == {
        "X-Budget-Cost-Estimated": "0.002500",
        "X-Budget-Id": "team:a",
        "X-Budget-Status": "soft_limit",
        "X-Budget-Utilization": "82.35",
        "X-Budget-Remaining": "17.65",
        "X-Budget-Reset": "2026-12-01T00:00:00Z",
    }
