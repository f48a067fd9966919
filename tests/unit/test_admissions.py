"""Where a router's admissions and the ledger's statuses could disagree, and do not: a covers-only change is
published, an admission without a position falls back on the grace, covers of another month never drop one, and
parent budgets count admissions as decide holds requests to them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from budgetflow.schemas.events import BudgetStatus, Heartbeat, LedgerEntry, entry_id
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.serde import decode
from budgetflow.schemas.settings import Settings
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.statuses import StatusPublisher
from budgetflow.streams.aggregate.store import MemoryStore
from budgetflow.streams.gateway.view import BudgetView
from budgetflow.streams.rules.status import StatusRules

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
USD = 10**12


def policy_for(budget: str) -> BudgetPolicy:
    return BudgetPolicy(id=budget, monthly_limit_usd="100")  # type: ignore[arg-type]


def entry(kind: str, request: str, amount: int, source: tuple[int, int]) -> LedgerEntry:
    return LedgerEntry(
        entry_id=entry_id(request, 0, kind, "team:a"),
        budget_id="team:a",
        request_id=request,
        kind=kind,  # type: ignore[arg-type]
        period="2026-11",
        amount_pico_usd=amount,
        occurred_at=NOW,
        source_partition=source[0],
        source_offset=source[1],
    )


def batch(ledger: PartitionLedger, entries: list[LedgerEntry], start: int) -> None:
    for offset, e in enumerate(entries, start=start):
        ledger.apply(e, offset)
    ledger.store.write(dict(ledger.drain()), checkpoint=start + len(entries) - 1)


def test_a_failed_attempt_settled_at_zero_in_one_batch_is_published_as_covered_at_refresh() -> None:
    """examples/gateway.py on ModelUnavailable: request, admit, then usage 0 'failed' at once. The spend does not
    move, but the status must still come to say it counts the request, or the router counts it for max age."""
    ledger = PartitionLedger(0, MemoryStore(), LedgerConfig(), policy_for)
    publisher = StatusPublisher(StatusRules(), policy_for, lambda: NOW, refresh_s=0)
    # An earlier request, published: the router has its status.
    batch(ledger, [entry("reserve", "r1", 30 * USD, (0, 0)), entry("settle", "r1", 30 * USD, (0, 0))], 0)
    (first,) = [o for o in publisher.after_batch(ledger, *ledger.take_outputs()) if o.role == "status"]
    view = BudgetView(Settings())
    view.apply_heartbeat(Heartbeat(partition=0, as_of=NOW, stream_time=NOW, lag_s=0))
    view.apply_status(decode(BudgetStatus, first.value)[0])
    # The failed attempt: the router admits $20 of cloud at request event (0, 1); the attempt fails, usage (0, 1).
    view.admit(["team:a"], 20 * USD, now=NOW, source=(0, 1))
    batch(ledger, [entry("reserve", "r2", 20 * USD, (0, 1)), entry("settle", "r2", 0, (0, 1))], 2)
    out = publisher.after_batch(ledger, *ledger.take_outputs()) + publisher.refresh(ledger)
    period = ledger.period_state("team:a", "2026-11")
    assert period is not None
    assert period.covers == {0: 1}  # the ledger covers it
    assert period.spend == 30 * USD
    (covering,) = [o for o in out if o.role == "status"]  # a refresh (refresh_s is 0 here)
    assert view.status("team:a", now=NOW).spend_pico == 50 * USD  # until then the router counts it
    view.apply_status(decode(BudgetStatus, covering.value)[0])
    assert view.status("team:a", now=NOW).spend_pico == 30 * USD  # the ledger's


def test_an_admission_without_a_position_counts_until_a_status_a_grace_newer() -> None:
    """view.admit(budgets, estimate) and /v1/admit without positions: nothing can match it to a status."""
    view = BudgetView(Settings())
    view.apply_heartbeat(Heartbeat(partition=0, as_of=NOW, stream_time=NOW, lag_s=0))
    view.admit(["team:a"], 20 * USD, now=NOW)
    status = BudgetStatus(
        budget_id="team:a",
        period="2026-11",
        status="normal",
        spend_usd=20 * USD,  # the ledger has the admission's reserve already
        settled_usd=0,
        reserved_usd=20 * USD,
        limit_usd=100 * USD,
        soft_limit_percent=80,
        hard_limit_action="block_cloud",
        utilization_percent=20.0,
        remaining_usd=80 * USD,
        as_of=NOW + timedelta(seconds=5),
        next_reset=datetime(2026, 12, 1, tzinfo=UTC),
        reason="refresh",
        partition=0,
        seq=5,
    )
    view.apply_status(status)
    later = NOW + timedelta(seconds=59)
    view.apply_heartbeat(Heartbeat(partition=0, as_of=later, stream_time=later, lag_s=0))
    assert view.status("team:a", now=later).spend_pico == 20 * USD  # the status, 5 s newer, includes it


def test_a_status_of_last_month_never_drops_an_admission_of_this_month() -> None:
    view = BudgetView(Settings())
    december = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
    view.apply_heartbeat(Heartbeat(partition=0, as_of=december, stream_time=december, lag_s=0))
    admission = view.admit(["team:a"], 20 * USD, now=december, source=(0, 50))
    assert view.status("team:a", now=december).spend_pico == 20 * USD
    november = BudgetStatus(
        budget_id="team:a",
        period="2026-11",
        status="normal",
        spend_usd=10 * USD,
        settled_usd=10 * USD,
        reserved_usd=0,
        limit_usd=100 * USD,
        soft_limit_percent=80,
        hard_limit_action="block_cloud",
        utilization_percent=10.0,
        remaining_usd=90 * USD,
        as_of=december,
        next_reset=datetime(2026, 12, 1, tzinfo=UTC),
        reason="refresh",
        partition=0,
        seq=5,
        covers={0: 60},  # November's record: a November request event appended after this admission's
    )
    view.apply_status(november)
    assert admission.period == "2026-12"
    # November's covers say nothing of December: the admission still counts.
    assert view.status("team:a", now=december).spend_pico == 20 * USD


def test_an_admission_counts_on_the_parent_budget_that_decide_binds() -> None:
    from budgetflow.schemas.policy import parse_policy_file
    from budgetflow.streams.gateway.routing import Candidate

    policies = {
        p.id: p
        for p in parse_policy_file(
            {
                "budgets": [
                    {"id": "team:a", "parent": "org:eng"},
                    {"id": "org:eng", "monthly_limit_usd": "100", "hard_limit_action": "block_all"},
                ]
            }
        ).budgets
    }
    view = BudgetView(Settings())
    view.use_policies(lambda: policies)
    view.apply_heartbeat(Heartbeat(partition=0, as_of=NOW, stream_time=NOW, lag_s=0))
    view.apply_status(
        BudgetStatus(
            budget_id="org:eng",
            period="2026-11",
            status="normal",
            spend_usd=0,
            settled_usd=0,
            reserved_usd=0,
            limit_usd=100 * USD,
            soft_limit_percent=80,
            hard_limit_action="block_all",
            as_of=NOW,
            next_reset=datetime(2026, 12, 1, tzinfo=UTC),
            reason="refresh",
            partition=0,
            seq=1,
        )
    )
    view.admit(["team:a"], 150 * USD, now=NOW, source=(0, 1))  # past the parent's whole limit
    assert view.status("team:a", now=NOW).spend_pico == 150 * USD
    assert view.status("org:eng", now=NOW).spend_pico == 150 * USD  # enrich charges org:eng: so does the router
    assert view.decide("r2", ["team:a"], [Candidate("small-1", "cloud", 2)], now=NOW).rejection is not None
