"""Read what the pipeline published: statuses, heartbeats, period states (for the CLI and tests)."""

from __future__ import annotations

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import BudgetStatus, Heartbeat
from budgetflow.schemas.serde import decode
from budgetflow.schemas.settings import Settings
from budgetflow.streams.aggregate.records import PeriodState, decode_key
from budgetflow.streams.kafka.follow import read_topic

__all__ = ["read_heartbeats", "read_period_states", "read_statuses"]


async def read_statuses(settings: Settings, topic: str) -> dict[str, BudgetStatus]:
    """The latest status per budget: the highest ``seq`` wins, and on a tie the later record."""
    latest: dict[str, BudgetStatus] = {}
    for _, key, value, _ in await read_topic(settings, topic):
        if key is None or value is None:
            continue
        try:
            status, _ = decode(BudgetStatus, value)
        except InvalidEvent:
            continue
        current = latest.get(status.budget_id)
        if current is None or status.seq >= current.seq:
            latest[status.budget_id] = status
    return latest


async def read_heartbeats(settings: Settings, topic: str) -> dict[int, Heartbeat]:
    """The latest heartbeat per ledger partition."""
    latest: dict[int, Heartbeat] = {}
    for _, _, value, _ in await read_topic(settings, topic):
        try:
            beat, _ = decode(Heartbeat, value)
        except InvalidEvent:
            continue
        latest[beat.partition] = beat
    return latest


async def read_period_states(settings: Settings, topic: str) -> dict[tuple[str, str], PeriodState]:
    """The aggregate's exact period states, from its changelog (latest value per key)."""
    states: dict[tuple[str, str], PeriodState] = {}
    for _, key, value, _ in await read_topic(settings, topic):
        if key is None or not key.startswith(b"p|"):
            continue
        _, (budget, period) = decode_key(key)
        if value is None:
            states.pop((budget, period), None)
        else:
            states[(budget, period)] = PeriodState.decode(budget, period, value)
    return states
