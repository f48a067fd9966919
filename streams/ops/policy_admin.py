"""`budgetflow policy apply`: a policy file validated whole, then only what changed published, each change audited."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaProducer

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.events import AuditRecord
from budgetflow.schemas.policy import BudgetPolicy, parse_policy_file
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import Settings
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.ops.audit import send_audit
from budgetflow.streams.rules.policies import read_policies

__all__ = ["PolicyPlan", "apply_policy_file", "load_policy_file", "plan"]


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
    wanted = await load_policy_file(path)
    current = await read_policies(settings, topic)
    result = plan(current, wanted, prune)
    if dry_run:
        return result
    producer = AIOKafkaProducer(**client_options(settings.kafka), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        changes = await _publish(producer, topic, result, current)
        if audit_topic is not None:
            at, principal = now or datetime.now(UTC), settings.kafka.security.sasl_username
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


async def load_policy_file(path: Path) -> list[BudgetPolicy]:
    """The budgets of a policy file, each validated (:class:`ConfigError` names the file, the entry and the field)."""
    try:
        data = yaml.safe_load(await asyncio.to_thread(path.read_text))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    return parse_policy_file(data, source=str(path)).budgets


_Change = tuple[str, BudgetPolicy | None, BudgetPolicy | None, Any]  # budget, before, after, the send's future


async def _publish(
    producer: AIOKafkaProducer, topic: str, result: PolicyPlan, current: dict[str, BudgetPolicy]
) -> list[_Change]:
    """Send what changed: the added and changed policies, and a tombstone for each removed one."""
    changes: list[_Change] = []
    for old, new in [(None, p) for p in result.added] + list(result.changed):
        sent = await producer.send(topic, key=new.id.encode(), value=dumps(new.model_dump(mode="json")))
        changes.append((new.id, old, new, sent))
    for budget in result.removed:
        changes.append((budget, current[budget], None, await producer.send(topic, key=budget.encode(), value=None)))
    return changes
