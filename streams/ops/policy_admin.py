"""`budgetflow policy apply`: a policy file validated whole, then only what changed published, each change audited."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.events import AuditRecord
from budgetflow.schemas.money import format_usd
from budgetflow.schemas.policy import BudgetPolicy, Scope, parse_policy_text
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import Settings
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.ops.audit import send_audit
from budgetflow.streams.rules.policies import read_policies

__all__ = ["PolicyPlan", "apply_policies", "apply_policy_file", "load_policy_file", "plan", "plan_lines"]


@dataclass(frozen=True)
class PolicyPlan:
    """What `policy apply` will do."""

    added: list[BudgetPolicy]
    changed: list[tuple[BudgetPolicy, BudgetPolicy]]
    removed: list[str]
    unchanged: list[str]
    kept: list[str] = field(default_factory=list)
    """On the topic but not in the file, and kept because ``prune`` was not asked for."""


def plan(current: dict[str, BudgetPolicy], wanted: list[BudgetPolicy], prune: bool) -> PolicyPlan:
    added = [p for p in wanted if p.id not in current]
    changed = [(current[p.id], p) for p in wanted if p.id in current and current[p.id] != p]
    unchanged = [p.id for p in wanted if p.id in current and current[p.id] == p]
    wanted_ids = {p.id for p in wanted}
    stray = sorted(b for b in current if b not in wanted_ids)
    return PolicyPlan(added, changed, stray if prune else [], unchanged, [] if prune else stray)


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
    """Validate every entry of the file, then :func:`apply_policies`."""
    wanted = await load_policy_file(path)
    return await apply_policies(
        settings, topic, wanted, prune=prune, dry_run=dry_run, audit_topic=audit_topic, actor=actor, now=now
    )


async def apply_policies(
    settings: Settings,
    topic: str,
    wanted: list[BudgetPolicy],
    *,
    prune: bool,
    dry_run: bool = False,
    audit_topic: str | None = None,
    actor: str = "unknown",
    now: datetime | None = None,
) -> PolicyPlan:
    """Publish what changed (tombstones only with ``prune``); with ``dry_run``, only read the topic and plan.

    Each change is also appended to ``audit_topic``: who, when, the policy before and after, and the
    revision (the new record's offset on the policies topic).
    """
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
    """The budgets of a policy file, YAML or (``.toml``) TOML, each validated with its numbers exact.

    :class:`ConfigError` names the file, the line (YAML) or the budget (TOML), and the field.
    """
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    return parse_policy_text(text, source=str(path), toml=path.suffix.lower() == ".toml").budgets


def plan_lines(result: PolicyPlan) -> list[str]:
    """What a plan does, one line per budget: ``+`` added, ``~`` changed (each field old -> new), ``-`` removed."""
    lines = [f"+ {p.id}: " + ", ".join(f"{f} {_shown(p, f)}" for f in _fields(p)) for p in result.added]
    for old, new in result.changed:
        fields = [f for f in type(new).model_fields if getattr(old, f) != getattr(new, f)]
        lines.append(f"~ {new.id}: " + ", ".join(f"{f} {_shown(old, f)} -> {_shown(new, f)}" for f in fields))
    lines += [f"- {budget}" for budget in result.removed]
    lines += [f"= {budget}: on the topic, not in the file; kept (--prune deletes it)" for budget in result.kept]
    return lines


def _fields(policy: BudgetPolicy) -> list[str]:
    """The limit, the soft limit and the action always; any other field only when it is not its default."""
    always = ("monthly_limit_usd", "soft_limit_percent", "hard_limit_action")
    fields = type(policy).model_fields
    return [f for f in fields if f in always or (f != "id" and getattr(policy, f) != fields[f].default)]


def _shown(policy: BudgetPolicy, name: str) -> str:
    """A field as an operator wrote it: dollars exact (``$20.00``, ``$0.000001``), text quoted, a scope in brief."""
    value = getattr(policy, name)
    if name == "monthly_limit_usd":
        return "unlimited" if value is None else "$" + _dollars(value)
    if isinstance(value, Scope):
        parts = [(k, getattr(value, k)) for k in ("provider", "model", "backend") if getattr(value, k) is not None]
        parts += [(f"metadata.{k}", v) for k, v in value.metadata.items()]
        return "{" + ", ".join(f"{k}={v}" for k, v in parts) + "}"
    if name == "description" and value is not None:
        return '"' + str(value).replace("\n", " ") + '"'
    return "none" if value is None else str(value)


def _dollars(pico: int) -> str:
    exact = format_usd(pico, 12).rstrip("0")
    whole, _, cents = exact.partition(".")
    return f"{whole}.{cents.ljust(2, '0')}"


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
