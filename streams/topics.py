"""The topics of design.md: names (a prefix renames them all), partitions and configs.

Workers create what is missing with the admin client and refuse to run on a
topic whose partitions or cleanup policy are wrong: an auto-created compacted
topic is silently a delete topic, and a ledger resized in place would move
keys away from their state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.settings import Settings, TopicSettings

__all__ = ["TopicSpec", "Topics", "ensure_topics", "ensure_topics_now", "partition_for", "topic_partitions"]

log = logging.getLogger(__name__)

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its name, partitions and configs, and what its records are."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    holds: str = ""

    @property
    def compacted(self) -> bool:
        return "compact" in self.config.get("cleanup.policy", "delete")


class Topics:
    """Every topic budgetflow uses, named from the settings."""

    def __init__(self, settings: TopicSettings) -> None:
        prefix, n = settings.prefix, settings.partitions
        self.replication_factor = settings.replication_factor
        self.requests = TopicSpec(f"{prefix}requests", n, {
            "cleanup.policy": "delete", "retention.ms": str(settings.requests_retention_ms),
            "segment.ms": str(settings.requests_segment_ms)},
            "RequestEvent keyed by request_id (holds prompt text: short retention)")  # fmt: skip
        self.usage = TopicSpec(f"{prefix}usage", n, {"cleanup.policy": "delete"}, "UsageEvent keyed by request_id")
        # The broker stamps ledger records (LogAppendTime): a tick's time is bounded by it, so a worker whose clock
        # runs ahead cannot move stream time (and expire reservations, and make entries late) on its own say.
        self.ledger = TopicSpec(f"{prefix}ledger", n, {
            "cleanup.policy": "delete", "retention.ms": str(400 * _DAY_MS),
            "message.timestamp.type": "LogAppendTime"}, "LedgerEntry keyed by budget id (the audit trail)")  # fmt: skip
        self.policies = TopicSpec(f"{prefix}policies", n, {"cleanup.policy": "compact"},
                                  "BudgetPolicy keyed by budget id; a null value deletes")  # fmt: skip
        self.status = TopicSpec(f"{prefix}budget-status", 1, {
            "cleanup.policy": "compact", "segment.ms": str(10 * 60_000), "min.cleanable.dirty.ratio": "0.1"},
            "BudgetStatus keyed by budget id, current period")  # fmt: skip
        self.heartbeats = TopicSpec(f"{prefix}heartbeats", 1, {
            "cleanup.policy": "compact", "segment.ms": str(10 * 60_000)},
            "Heartbeat keyed by ledger partition")  # fmt: skip
        self.events = TopicSpec(f"{prefix}budget-events", 1, {"cleanup.policy": "delete"},
                                "status transitions keyed budget:period:event")  # fmt: skip
        self.dlq = TopicSpec(f"{prefix}dlq", 1, {"cleanup.policy": "delete", "retention.ms": str(7 * _DAY_MS)},
                             "records that failed a stage, redacted, with the reason in headers")  # fmt: skip
        self.audit = TopicSpec(f"{prefix}audit", 1, {"cleanup.policy": "delete", "retention.ms": "-1"},
                               "AuditRecord keyed by budget id: policy changes and adjustments, kept")  # fmt: skip
        self.notifications = TopicSpec(f"{prefix}notifications", 1, {"cleanup.policy": "compact"},
                                       "the budget events `budgetflow notify` has posted, keyed like them")  # fmt: skip
        self.state = TopicSpec(f"{prefix}aggregate-state", n, {"cleanup.policy": "compact"},
                               "the aggregate's state changelog, co-partitioned with the ledger")  # fmt: skip

    def all(self) -> list[TopicSpec]:
        return [self.requests, self.usage, self.ledger, self.policies, self.status, self.heartbeats, self.events,
                self.dlq, self.state, self.audit, self.notifications]  # fmt: skip

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        return cls(settings.topics)


async def ensure_topics(admin: AIOKafkaAdminClient, topics: Topics, specs: list[TopicSpec] | None = None) -> None:
    """Create missing topics with their configs; refuse existing ones that are wrong."""
    wanted = specs or topics.all()
    existing = set(await admin.list_topics())
    missing = [s for s in wanted if s.name not in existing]
    if missing:
        try:
            await admin.create_topics(
                [NewTopic(s.name, s.partitions, topics.replication_factor, topic_configs=s.config) for s in missing]
            )
            log.info("created topics %s", ", ".join(s.name for s in missing))
        except TopicAlreadyExistsError:
            pass  # another worker created them first
        except KafkaError as exc:
            raise ConfigError(f"cannot create topics ({exc.__class__.__name__}: {exc})") from exc
    await _check(admin, wanted)


async def _check(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
    import asyncio

    # Topics created a moment ago may not show their partitions in the metadata yet.
    for _ in range(50):
        described = await admin.describe_topics([s.name for s in specs])
        partitions = {t["topic"]: len(t["partitions"]) for t in described if t.get("error_code", 0) == 0}
        if all(partitions.get(s.name) for s in specs):
            break
        await asyncio.sleep(0.2)
    for spec in specs:
        have = partitions.get(spec.name)
        # The single-partition topics may be larger; co-partitioned ones must match exactly.
        if have is None or (spec.partitions > 1 and have != spec.partitions):
            raise ConfigError(
                f"topic {spec.name} has {have} partitions, budgetflow expects {spec.partitions} "
                "(BUDGETFLOW_TOPICS__PARTITIONS); partitions cannot change in place, see the README's migration"
            )
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    compacted = [s for s in specs if s.compacted]
    if not compacted:
        return
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, s.name) for s in compacted])
    policies: dict[str, str] = {}
    for response in responses:
        for resource in response.resources:
            name = resource[3]
            for entry in resource[4]:
                if entry[0] == "cleanup.policy":
                    policies[name] = entry[1]
    for spec in compacted:
        if "compact" not in policies.get(spec.name, ""):
            raise ConfigError(f"topic {spec.name} must be compacted but has cleanup.policy={policies.get(spec.name)!r}")


def partition_for(key: str, partitions: int) -> int:
    """The partition a key lands on with Kafka's default partitioner (murmur2, as the Java client)."""
    from aiokafka.partitioner import murmur2

    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


async def ensure_topics_now(settings: Settings, topics: Topics, specs: list[TopicSpec] | None = None) -> None:
    """`ensure_topics` with an admin client of its own."""
    from budgetflow.streams.clients import client_options

    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    await admin.start()
    try:
        await ensure_topics(admin, topics, specs)
    finally:
        await admin.close()


async def topic_partitions(settings: Settings, topic: str, wait_s: float = 15.0) -> list[int]:
    """The partitions of a topic; waits a little for a topic that was just created."""
    import asyncio

    from budgetflow.streams.clients import client_options

    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    await admin.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    try:
        while True:
            described = await admin.describe_topics([topic])
            found = [d for d in described if d.get("topic") == topic and d.get("error_code", 0) == 0]
            if found and found[0]["partitions"]:
                return sorted(p["partition"] for p in found[0]["partitions"])
            if loop.time() > deadline:
                raise ConfigError(f"topic {topic} does not exist; run `budgetflow topics create` (or start a worker)")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
