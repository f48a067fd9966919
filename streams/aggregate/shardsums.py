"""A sharded budget's sums: what a shard's worker sends home, and how the home merges them.

A shard (``budget#k``) is an ordinary ledger account on its own partition: its entries are counted exactly once
by the ledger's rules. After every batch that changed a shard's month, its worker sends the shard's sums to the
budget's home partition as a ``partial`` entry (:func:`partial_entries`). A partial is a snapshot, not a
difference: the home keeps, per shard, the one with the highest ``(version, covered)`` and sums them
(:func:`merge`). ``version`` is the shard record's ledger offset and ``covered`` the sum of its covers, and
neither ever goes down, so a partial replayed, sent twice or overtaken by a later one changes nothing; the home
applies partials as it applies any entry, in offset order and idempotent across a crash, and judges the budget's
status, transitions and ``seq`` on the merged sums as for an unsharded budget.

Covers merge to the lowest of the shards' for each input partition: a router may rely on the status counting an
event only once every shard that could hold it has counted it.
"""

from __future__ import annotations

from collections.abc import Iterable

from budgetflow.schemas.events import LedgerEntry, ShardSum
from budgetflow.schemas.periods import month_start
from budgetflow.schemas.serde import dumps
from budgetflow.streams.aggregate.records import PeriodState
from budgetflow.streams.rules.shards import home_of

__all__ = ["merge", "partial_entries"]


def _covered(part: ShardSum) -> int:
    return sum(part.covers.values()) + sum(part.covers_usage.values())


def _lowest(maps: list[dict[int, int]]) -> dict[int, int]:
    """For each partition that every map names, the lowest offset (a partition some shard lacks is not covered)."""
    if not maps:
        return {}
    common = set(maps[0]).intersection(*maps[1:])
    return {p: min(m[p] for m in maps) for p in sorted(common)}


def merge(period: PeriodState, part: ShardSum, max_period_pico: int) -> bool | None:
    """Take a shard's sums into its budget's home record: True if they changed it, None for a snapshot no newer
    than the one held, False if the total would pass the bound of a period (refused whole, nothing changes)."""
    old = period.shards.get(part.shard)
    if old is not None and (old.version, _covered(old)) >= (part.version, _covered(part)):
        return None
    settled = period.settled + part.settled - (old.settled if old else 0)
    reserved = period.reserved + part.reserved - (old.reserved if old else 0)
    if abs(settled) + reserved > max_period_pico:
        return False
    period.settled, period.reserved = settled, reserved
    period.requests += part.requests - (old.requests if old else 0)
    period.settles += part.settles - (old.settles if old else 0)
    period.shards[part.shard] = part
    parts = [period.shards[k] for k in sorted(period.shards)]
    period.covers = _lowest([p.covers for p in parts])
    period.covers_usage = _lowest([p.covers_usage for p in parts])
    return True


def partial_entries(
    periods: dict[tuple[str, str], PeriodState], touched: Iterable[tuple[str, str]]
) -> list[tuple[str, bytes]]:
    """(home budget, partial entry JSON) for each shard account's month in ``touched``, in a stable order."""
    out = []
    for account, period in sorted(touched):
        budget, shard = home_of(account)
        state = periods.get((account, period))
        if shard is None or state is None or state.ledger_offset < 0:
            continue
        part = ShardSum(
            shard=shard,
            version=state.ledger_offset,
            settled=state.settled,
            reserved=state.reserved,
            requests=state.requests,
            settles=state.settles,
            covers=state.covers,
            covers_usage=state.covers_usage,
        )
        entry = LedgerEntry(
            v=1,
            entry_id=f"partial:{account}:{period}:{part.version}:{_covered(part)}",
            budget_id=budget,
            request_id=account,
            kind="partial",
            period=period,
            amount_pico_usd=0,
            occurred_at=month_start(period),
            shard_sum=part,
        )
        out.append((budget, dumps(entry)))
    return out
