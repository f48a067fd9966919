"""The ledger's configuration (time rules, bounds) and what it announces: a status change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from budgetflow.schemas.events import StatusName
from budgetflow.schemas.money import MAX_PERIOD_PICO
from budgetflow.streams.rules.status import StatusRules

if TYPE_CHECKING:
    from budgetflow.schemas.settings import Settings

__all__ = ["LedgerConfig", "StatusChange"]


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A budget's status changed in a period: announced once per budget, period and event (the new status)."""

    budget: str
    period: str
    event: str
    previous: StatusName
    settled: int
    reserved: int
    offset: int  # the ledger offset of the entry (or tick) that made the change


@dataclass(frozen=True)
class LedgerConfig:
    """The time rules (docs/architecture.md, "Time through the stream"), in seconds, and the ledger's bounds."""

    horizon_s: int = 86_400
    grace_s: int = 7 * 86_400
    default_ttl_s: int = 3_600
    rules: StatusRules = field(default_factory=StatusRules)
    sweep_keys_per_tick: int = 20_000
    sweep_interval_s: float = 600.0
    keep_periods: int = 13
    max_period_pico: int = MAX_PERIOD_PICO

    @classmethod
    def from_settings(cls, settings: Settings) -> LedgerConfig:
        return cls(
            horizon_s=settings.dedupe_horizon_s,
            grace_s=settings.period_grace_s,
            default_ttl_s=settings.reservation.ttl_s,
            rules=StatusRules(settings.status.hysteresis_points, settings.status.step_points),
            sweep_keys_per_tick=settings.worker.sweep_keys_per_tick,
        )
