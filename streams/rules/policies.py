"""Budget policies on their compacted topic: reading and following them (``budgetflow policy apply`` writes them:
:mod:`budgetflow.streams.ops.policy_admin`).

Every aggregate worker follows the whole policies topic (it is small), so a
policy change takes effect without a restart wherever the budget's ledger
partition lives. A budget without a policy uses the default policy from the
settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.serde import loads
from budgetflow.schemas.settings import DefaultPolicySettings, Settings
from budgetflow.streams.kafka.follow import Follower, read_records

__all__ = ["PolicyBook", "default_policy", "read_policies"]

log = logging.getLogger(__name__)


def default_policy(budget_id: str, defaults: DefaultPolicySettings) -> BudgetPolicy:
    """The policy of a budget that has none of its own."""
    return BudgetPolicy(
        id=budget_id,
        monthly_limit_usd=defaults.monthly_limit_usd,  # type: ignore[arg-type]  # validated as a decimal string
        soft_limit_percent=defaults.soft_limit_percent,
        hard_limit_action=defaults.hard_limit_action,
    )


async def read_policies(settings: Settings, topic: str) -> dict[str, BudgetPolicy]:
    """Every policy on the topic now (latest value per budget; tombstones delete)."""
    policies: dict[str, BudgetPolicy] = {}
    for record in await read_records(settings, topic):
        _absorb(policies, record.key, record.value)
    return policies


def _absorb(
    policies: dict[str, BudgetPolicy], key: bytes | None, value: bytes | None, on_skip: Callable[[], None] | None = None
) -> str | None:
    """Apply one policy record; return the budget it changed (None for a malformed one, which is skipped)."""
    if key is None:
        return None
    budget = key.decode(errors="replace")
    if value is None:
        policies.pop(budget, None)
        return budget
    try:
        policy = BudgetPolicy.model_validate(loads(value))
        # The key is what compaction and tombstones go by: a record filed under another key would outlive them.
        problem = None if policy.id == budget else "its id is not its key"
    except (ValidationError, ValueError, InvalidEvent) as exc:
        problem = exc.__class__.__name__
    if problem is not None:
        # One bad record must not keep anything from starting: the budget keeps its last good policy.
        log.error("skipping a malformed policy record for %r: %s", budget[:128], problem)
        if on_skip is not None:
            on_skip()
        return None
    policies[policy.id] = policy
    return policy.id


class PolicyBook:
    """Follows the policies topic in the background; ``policy_for`` never blocks."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        on_change: Callable[[str], None] | None = None,
        on_skip: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_skip = on_skip
        self._topic = topic
        self._policies: dict[str, BudgetPolicy] = {}
        self._defaults: dict[str, BudgetPolicy] = {}
        self._on_change = on_change
        self.ready = asyncio.Event()
        self._follower: Follower | None = None

    def policy_for(self, budget_id: str) -> BudgetPolicy:
        policy = self._policies.get(budget_id)
        if policy is not None:
            return policy
        default = self._defaults.get(budget_id)
        if default is None:
            default = default_policy(budget_id, self._settings.default_policy)
            self._defaults[budget_id] = default
        return default

    def budgets(self) -> list[str]:
        return list(self._policies)

    @property
    def policies(self) -> dict[str, BudgetPolicy]:
        """The policies now (the live mapping: read it, do not keep it)."""
        return self._policies

    async def start(self) -> None:
        """Read the topic to its end (then ``ready`` is set), and go on following it in the background."""
        self._follower = Follower(self._settings, [self._topic], self._absorb_record, name="policy-follower")
        await self._follower.start()
        await self._follower.caught_up.wait()
        self.ready.set()

    def _absorb_record(self, record: ConsumerRecord) -> None:
        changed = _absorb(self._policies, record.key, record.value, self._on_skip)
        if changed is not None and self._on_change is not None and self._caught_up():
            self._on_change(changed)

    def _caught_up(self) -> bool:
        """Changes are announced once the picture at start is read (before, nobody acts on policies yet)."""
        return self._follower is not None and self._follower.caught_up.is_set()

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()
