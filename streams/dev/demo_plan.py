"""What `budgetflow demo` sends and to whom: the month's planned requests, the budgets and keys they are charged
to, and the policies sized so that every kind of status change happens in the month.

Pure: no broker, no processes, no clock but the start of the month it is given.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from budgetflow.schemas.money import format_usd
from budgetflow.schemas.periods import next_month_start, period_of

__all__ = [
    "BUDGETS",
    "DEMO_KEY",
    "KEY_BUDGET",
    "TEAM_KEYS",
    "DemoConfig",
    "Planned",
    "Tally",
    "expected_spend",
    "gateway_keys",
    "local_outage",
    "plan",
    "policies",
]

DEMO_KEY = "sk-demo-mobile-app"
KEY_BUDGET = "key:" + hashlib.sha256(DEMO_KEY.encode()).hexdigest()[:8]
# Each team calls the gateway with a key of its own; the gateway charges a key's requests to its budgets.
TEAM_KEYS = {"team:search": "sk-demo-search", "team:support": "sk-demo-support", None: "sk-demo-batch"}
MODELS = [("gpt-4o", 5), ("gpt-4o-mini", 6), ("claude-sonnet-4-5", 3), ("gpt-4.1", 2)]
TEAMS = {"team:search": 0.5, "team:support": 0.35, None: 0.15}
BUDGETS = ["global", "team:search", "team:support", KEY_BUDGET]


@dataclass
class DemoConfig:
    duration_s: float = 60.0
    requests: int = 3000
    seed: int = 2026
    keep_running: bool = False
    summary_json: Path | None = None
    concurrency: int = 8


@dataclass
class Tally:
    """What the demo itself saw, per budget: independent of the pipeline's books."""

    cloud: int = 0
    local: int = 0
    rejected: int = 0
    fallbacks: int = 0  # shifted to local, the local model down: served by the cloud fallback
    unserved: int = 0  # the local model down and cloud blocked: no model left to answer (a 502)
    cost_pico: dict[str, int] = field(default_factory=dict)  # per period
    saved_pico: int = 0


@dataclass
class Planned:
    """One request of the plan: when, charged to whom, to which model, how large."""

    at: datetime
    team: str | None
    key: bool
    model: str
    size: int
    max_tokens: int
    insist_on_cloud: bool = False

    @property
    def budgets(self) -> list[str]:
        """The budgets the gateway charges it to."""
        return [b for b in ("global", self.team, KEY_BUDGET if self.key else None) if b]


def plan(config: DemoConfig, start: datetime) -> list[Planned]:
    """Requests over the month: a daily rhythm, a burst from team:search on day 20, and a tail into the next month."""
    rng = random.Random(config.seed)
    month_s = (next_month_start(period_of(start)) - start).total_seconds()
    models = [m for m, weight in MODELS for _ in range(weight)]
    planned: list[Planned] = []
    while len(planned) < config.requests:
        offset = rng.uniform(0, month_s * 1.02)  # two percent of the traffic lands after the month ends
        hour = ((start + timedelta(seconds=offset)).hour + 24) % 24
        if rng.random() > 0.35 + 0.65 * math.sin(math.pi * max(0, hour - 6) / 16) ** 2 * (6 <= hour <= 22):
            continue  # nights are quiet
        team = rng.choices(list(TEAMS), weights=list(TEAMS.values()))[0]
        key = rng.random() < 0.12
        # The mobile app (its API key) always wants the cloud model: no local fallback.
        size = int(rng.lognormvariate(7, 1)) + 50
        at = start + timedelta(seconds=offset)
        planned.append(Planned(at, team, key, rng.choice(models), size, rng.choice((128, 256, 512, 1024)), key))
    # Day 20: a batch job of team:search that insists on the cloud model pushes the team over its hard limit.
    burst_at = start + timedelta(days=20)
    for i in range(max(20, config.requests // 15)):
        planned.append(
            Planned(
                burst_at + timedelta(minutes=i * 2), "team:search", False, "gpt-4.1", 6000, 2048, insist_on_cloud=True
            )
        )
    return sorted(planned, key=lambda p: p.at)


# Days 25 to 28 of the month, while budgets are in their soft band: the local model is down, and shifted requests
# fall back to cloud (or find no model, where cloud is blocked).
LOCAL_OUTAGE_DAYS = (25.0, 28.0)


def local_outage(start: datetime) -> tuple[datetime, datetime]:
    """When the demo's local model is down, on the simulated clock."""
    first, last = LOCAL_OUTAGE_DAYS
    return start + timedelta(days=first), start + timedelta(days=last)


def expected_spend(planned: list[Planned], table: Any) -> dict[str, int]:
    """What the planned traffic would cost on cloud, per budget (the example gateway's fake model answers
    with prompt tokens of about a quarter of the bytes and at most 64 output tokens)."""
    totals = dict.fromkeys(BUDGETS, 0)
    for item in planned:
        provider = "anthropic" if item.model.startswith("claude") else "openai"
        cost = table.cost(
            item.model, input_tokens=item.size // 4 + 12, output_tokens=min(item.max_tokens, 64), provider=provider
        ).pico_usd
        for budget in item.budgets:
            totals[budget] += cost
    return totals


def policies(expected: dict[str, int]) -> str:
    """Limits sized to the planned traffic, so that every kind of status change happens in the month."""

    def usd(pico: float) -> str:
        return format_usd(max(int(pico), 10**10), 2)

    return f"""budgets:
  - id: global
    monthly_limit_usd: "{usd(expected["global"] * 1.1)}"
    soft_limit_percent: 80
    hard_limit_action: block_cloud
    description: "company-wide"
  - id: "team:search"
    monthly_limit_usd: "{usd(expected["team:search"] * 0.8)}"
    soft_limit_percent: 75
    hard_limit_action: block_cloud
  - id: "team:support"
    monthly_limit_usd: "{usd(expected["team:support"] * 1.3)}"
    soft_limit_percent: 60
    hard_limit_action: warn
  - id: "{KEY_BUDGET}"
    monthly_limit_usd: "{usd(expected[KEY_BUDGET] * 0.6)}"
    hard_limit_action: block_all
    description: "the mobile app's API key"
"""


def gateway_keys() -> str:
    """The example gateway's key file: a key per team, and the mobile app's key, which may be charged to either
    team (each of its requests narrows that to one team, or none, with X-Budget-Ids)."""
    entries = [(key.removeprefix("sk-demo-"), key, [team] if team else []) for team, key in TEAM_KEYS.items()]
    entries.append(("mobile-app", DEMO_KEY, ["team:search", "team:support"]))
    lines = ["keys:"]
    for name, key, budgets in entries:
        digest = hashlib.sha256(key.encode()).hexdigest()
        lines.append(f'  - {{name: {name}, sha256: "{digest}", budgets: [{", ".join(budgets)}]}}')
    return "\n".join(lines) + "\n"
