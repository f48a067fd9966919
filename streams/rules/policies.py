"""Budget policies on their compacted topic: reading and following them (``budgetflow policy apply`` writes them:
:mod:`budgetflow.streams.ops.policy_admin`).

Every aggregate worker follows the whole policies topic (it is small), so a
policy change takes effect without a restart wherever the budget's ledger
partition lives. A budget without a policy uses the default policy from the
settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.serde import loads
from budgetflow.schemas.settings import DefaultPolicySettings, Settings
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.topics import topic_partitions

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
    consumer = AIOKafkaConsumer(**client_options(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await topic_partitions(settings, topic)]
        return await _read_to_end(consumer, partitions)
    finally:
        await consumer.stop()


async def _read_to_end(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], on_skip: Callable[[], None] | None = None
) -> dict[str, BudgetPolicy]:
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    ends = await consumer.end_offsets(partitions)
    policies: dict[str, BudgetPolicy] = {}
    remaining = {tp for tp in partitions if ends[tp] > 0}
    while remaining:
        batch = await consumer.getmany(*remaining, timeout_ms=500)
        for records in batch.values():
            for record in records:
                _absorb(policies, record.key, record.value, on_skip)
        for tp in list(remaining):
            if await consumer.position(tp) >= ends[tp]:
                remaining.discard(tp)
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
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

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
        self._consumer = AIOKafkaConsumer(**client_options(self._settings.kafka), enable_auto_commit=False)
        await self._consumer.start()
        partitions = [TopicPartition(self._topic, p) for p in await topic_partitions(self._settings, self._topic)]
        self._policies = await _read_to_end(self._consumer, partitions, self._on_skip)
        self.ready.set()
        self._task = asyncio.create_task(self._follow(), name="policy-follower")

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    changed = _absorb(self._policies, record.key, record.value, self._on_skip)
                    if changed is not None and self._on_change is not None:
                        self._on_change(changed)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
