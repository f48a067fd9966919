"""Budget policies on their compacted topic: following them in a worker, applying a file to them.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from budgetflow.schemas.errors import ConfigError, InvalidEvent
from budgetflow.schemas.events import AuditRecord
from budgetflow.schemas.policy import BudgetPolicy, parse_policy_file
from budgetflow.schemas.serde import dumps, loads
from budgetflow.schemas.settings import DefaultPolicySettings, Settings
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.topics import topic_partitions
from budgetflow.streams.ops.audit import send_audit

__all__ = ["PolicyBook", "PolicyChange", "apply_policy_file", "default_policy", "read_policies"]

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


@dataclass(frozen=True)
class PolicyChange:
    budget_id: str


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


@dataclass(frozen=True)
class PolicyPlan:
    """What `policy apply` will do."""

    added: list[BudgetPolicy]
    changed: list[tuple[BudgetPolicy, BudgetPolicy]]
    removed: list[str]
    unchanged: list[str]


def plan(current: dict[str, BudgetPolicy], wanted: list[BudgetPolicy], prune: bool) -> PolicyPlan:
    added = [p for p in wanted if p.id not in current]
    changed = [(current[p.id], p) for p in wanted if p.id in current and current[p.id] != p]
    unchanged = [p.id for p in wanted if p.id in current and current[p.id] == p]
    wanted_ids = {p.id for p in wanted}
    removed = sorted(b for b in current if b not in wanted_ids) if prune else []
    return PolicyPlan(added, changed, removed, unchanged)


async def apply_policy_file(
    settings: Settings,
    topic: str,
    path: Path,
    *,
    prune: bool,
    dry_run: bool = False,
    audit_topic: str | None = None,
    actor: str = "unknown",
    now: datetime | None = None,
) -> PolicyPlan:
    """Validate every entry of the file, then publish what changed (tombstones only with ``prune``).

    Each change is also appended to ``audit_topic``: who, when, the policy before and after, and the
    revision (the new record's offset on the policies topic).
    """
    try:
        data = yaml.safe_load(await asyncio.to_thread(path.read_text))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    wanted = parse_policy_file(data, source=str(path)).budgets
    current = await read_policies(settings, topic)
    result = plan(current, wanted, prune)
    if dry_run:
        return result
    producer = AIOKafkaProducer(**client_options(settings.kafka), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        changes: list[tuple[str, BudgetPolicy | None, BudgetPolicy | None, Any]] = []
        for old, new in [(None, p) for p in result.added] + list(result.changed):
            sent = await producer.send(topic, key=new.id.encode(), value=dumps(new.model_dump(mode="json")))
            changes.append((new.id, old, new, sent))
        for budget in result.removed:
            changes.append((budget, current[budget], None, await producer.send(topic, key=budget.encode(), value=None)))
        if audit_topic is not None:
            at = now or datetime.now(UTC)
            principal = settings.kafka.security.sasl_username
            records = [
                AuditRecord(
                    kind="policy",
                    budget_id=budget,
                    at=at,
                    actor=actor,
                    principal=principal,
                    revision=(await sent).offset,
                    old=old.model_dump(mode="json") if old else None,
                    new=new.model_dump(mode="json") if new else None,
                )
                for budget, old, new, sent in changes
            ]
            await send_audit(producer, audit_topic, records)
        await producer.flush()
    finally:
        await producer.stop()
    return result
