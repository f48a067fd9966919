"""The topics (docs/architecture.md, "Topics and keys"): names (a prefix renames them all), partitions and configs.

Workers create what is missing with the admin client and refuse to run on a
topic whose partitions or cleanup policy are wrong: an auto-created compacted
topic is silently a delete topic, and a ledger resized in place would move
keys away from their state.

The state changelog keeps its tombstones (deleted request states, closed
reservations, dropped months) for ``delete.retention.ms``; a local store that
resumes from a checkpoint older than that may have missed a deletion the
cleaner has since removed, and would keep the deleted state (a settled
reservation that expires again counts twice). budgetflow sets it to the span
its time rules look back (TTL + dedupe horizon + the month's grace), raises it
on an existing changelog that keeps less, and :func:`checkpoint_resumable`
tells a store whether it may resume or must restore from the start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.structs import TopicPartition

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.settings import Settings, TopicSettings

__all__ = [
    "TopicSpec",
    "Topics",
    "checkpoint_resumable",
    "ensure_topics",
    "ensure_topics_now",
    "partition_for",
    "state_delete_retention_ms",
    "topic_partitions",
    "under_replicated",
]

log = logging.getLogger(__name__)

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
# Configs an existing topic must have at least (more is fine): raised in place when lower.
_AT_LEAST = ("delete.retention.ms",)
# Configs an existing topic is set to exactly: the ledger's timestamps must be the broker's (a tick's bound).
_EXACTLY = ("message.timestamp.type",)
_DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs' config_source of a value set on the topic itself
_SETTLE_S = 10.0  # how long ensure_topics asks again when the broker answers with an error that passes


def state_delete_retention_ms(settings: Settings) -> int:
    """How long the state changelog keeps tombstones: as long as the time rules look back, at least Kafka's day.

    A request's state lives for its TTL plus the dedupe horizon, and a month takes entries for the grace after
    it ends; a store that missed less than their sum resumes from its checkpoint (8 days 1 hour by default).
    """
    look_back_s = settings.reservation.ttl_s + settings.dedupe_horizon_s + settings.period_grace_s
    return max(look_back_s * 1000, _DAY_MS)


# state_delete_retention_ms(Settings()), for a Topics made from TopicSettings alone (a unit test keeps them equal).
_DEFAULT_STATE_DELETE_RETENTION_MS = (3_600 + 86_400 + 7 * 86_400) * 1000


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

    # One table of every topic, its partitions, configs and contents: long, but read best whole.
    def __init__(
        self, settings: TopicSettings, *, state_delete_retention_ms: int = _DEFAULT_STATE_DELETE_RETENTION_MS
    ) -> None:
        prefix, n = settings.prefix, settings.partitions
        self.replication_factor = settings.replication_factor
        self.requests = TopicSpec(
            f"{prefix}requests",
            n,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(settings.requests_retention_ms),
                "segment.ms": str(settings.requests_segment_ms),
            },
            "RequestEvent keyed by request_id (holds prompt text: short retention)",
        )
        self.usage = TopicSpec(f"{prefix}usage", n, {"cleanup.policy": "delete"}, "UsageEvent keyed by request_id")
        # The broker stamps ledger records (LogAppendTime): a tick's time is bounded by it, so a worker whose clock
        # runs ahead cannot move stream time (and expire reservations, and make entries late) on its own say.
        self.ledger = TopicSpec(
            f"{prefix}ledger",
            n,
            {"cleanup.policy": "delete", "retention.ms": str(400 * _DAY_MS), "message.timestamp.type": "LogAppendTime"},
            "LedgerEntry keyed by budget id (the audit trail)",
        )
        self.policies = TopicSpec(
            f"{prefix}policies",
            n,
            {"cleanup.policy": "compact"},
            "BudgetPolicy keyed by budget id; a null value deletes",
        )
        self.status = TopicSpec(
            f"{prefix}budget-status",
            1,
            {"cleanup.policy": "compact", "segment.ms": str(10 * 60_000), "min.cleanable.dirty.ratio": "0.1"},
            "BudgetStatus keyed by budget id, current period",
        )
        self.heartbeats = TopicSpec(
            f"{prefix}heartbeats",
            1,
            {"cleanup.policy": "compact", "segment.ms": str(10 * 60_000)},
            "Heartbeat keyed by ledger partition",
        )
        self.lease_asks = TopicSpec(
            f"{prefix}lease-asks",
            n,
            {"cleanup.policy": "delete", "retention.ms": str(_DAY_MS)},
            "LeaseAsk keyed by budget id: routers asking for headroom (enrich makes them ledger entries)",
        )
        self.leases = TopicSpec(
            f"{prefix}budget-leases",
            1,
            {"cleanup.policy": "compact", "segment.ms": str(10 * 60_000), "min.cleanable.dirty.ratio": "0.1"},
            "LeaseGrant keyed budget|router: what each router may admit on a leased budget",
        )
        self.events = TopicSpec(
            f"{prefix}budget-events", 1, {"cleanup.policy": "delete"}, "status transitions keyed budget:period:event"
        )
        self.dlq = TopicSpec(
            f"{prefix}dlq",
            1,
            {"cleanup.policy": "delete", "retention.ms": str(7 * _DAY_MS)},
            "records that failed a stage, redacted, with the reason in headers",
        )
        self.audit = TopicSpec(
            f"{prefix}audit",
            1,
            {"cleanup.policy": "delete", "retention.ms": "-1"},
            "AuditRecord keyed by budget id: policy changes and adjustments, kept",
        )
        self.notifications = TopicSpec(
            f"{prefix}notifications",
            1,
            {"cleanup.policy": "compact"},
            "the budget events `budgetflow notify` has posted, keyed like them",
        )
        self.state = TopicSpec(
            f"{prefix}aggregate-state",
            n,
            {"cleanup.policy": "compact", "delete.retention.ms": str(state_delete_retention_ms)},
            "the aggregate's state changelog, co-partitioned with the ledger",
        )

        if settings.replication_factor > 1:
            # Replicated: an acks=all write is acknowledged by this many replicas, or refused (a lone replica's
            # acknowledgement would be lost with its broker). One replica keeps the broker's default, as before.
            for spec in self.all():
                spec.config["min.insync.replicas"] = str(settings.insync_replicas)

    def all(self) -> list[TopicSpec]:
        return [
            self.requests,
            self.usage,
            self.ledger,
            self.policies,
            self.status,
            self.heartbeats,
            self.lease_asks,
            self.leases,
            self.events,
            self.dlq,
            self.state,
            self.audit,
            self.notifications,
        ]

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        return cls(settings.topics, state_delete_retention_ms=state_delete_retention_ms(settings))


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
            if exc.retriable:
                raise  # the broker is busy or moving: the worker waits and tries again
            raise ConfigError(f"cannot create topics ({exc.__class__.__name__}: {exc})") from exc
    # A topic created a moment ago may be unknown yet to the broker asked next (on a cluster the metadata reaches
    # each broker in turn): what passes is asked again for a while before the caller hears of it.
    deadline = time.monotonic() + _SETTLE_S
    while True:
        try:
            await _check(admin, wanted, topics.replication_factor)
            return
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _check(admin: AIOKafkaAdminClient, specs: list[TopicSpec], replication_factor: int = 1) -> None:
    """Refuse topics with the wrong partition count or not compacted when they must be; raise configs that are
    below what budgetflow sets; warn of topics with fewer replicas than the settings ask."""
    partitions, replicas = await _partition_counts(admin, specs)
    _check_partitions(specs, partitions)
    for line in under_replicated(replicas, replication_factor):
        log.warning("%s", line)
    checked = [s for s in specs if s.compacted or any(key in s.config for key in _EXACTLY)]
    if not checked:
        return
    configs = await _topic_configs(admin, [s.name for s in checked])
    for spec in checked:
        policy = configs.get(spec.name, {}).get("cleanup.policy", (None, 0))[0]
        if spec.compacted and "compact" not in (policy or ""):
            raise ConfigError(f"topic {spec.name} must be compacted but has cleanup.policy={policy!r}")
    for spec in checked:
        await _raise_minimums(admin, spec, configs.get(spec.name, {}))


async def _partition_counts(
    admin: AIOKafkaAdminClient, specs: list[TopicSpec]
) -> tuple[dict[str, int], dict[str, int]]:
    """Each topic's partition count and the fewest replicas of its partitions; topics created a moment ago may not
    show them in the metadata yet."""
    partitions: dict[str, int] = {}
    described: list[dict[str, Any]] = []
    for _ in range(50):
        described = [t for t in await admin.describe_topics([s.name for s in specs]) if t.get("error_code", 0) == 0]
        partitions = {t["topic"]: len(t["partitions"]) for t in described}
        if all(partitions.get(s.name) for s in specs):
            break
        await asyncio.sleep(0.2)
    replicas = {t["topic"]: min(len(p["replicas"]) for p in t["partitions"]) for t in described if t["partitions"]}
    return partitions, replicas


def under_replicated(replicas: dict[str, int], replication_factor: int) -> list[str]:
    """A warning per topic with fewer replicas than ``TOPICS__REPLICATION_FACTOR``: budgetflow creates topics with
    it but never adds replicas in place (topics created on one broker stay on one when the cluster grows)."""
    return [
        f"topic {name} has {have} replica(s), BUDGETFLOW_TOPICS__REPLICATION_FACTOR is {replication_factor}: "
        "budgetflow does not add replicas to an existing topic (kafka-reassign-partitions.sh does)"
        for name, have in sorted(replicas.items())
        if have < replication_factor
    ]


def _check_partitions(specs: list[TopicSpec], partitions: dict[str, int]) -> None:
    for spec in specs:
        have = partitions.get(spec.name)
        # The single-partition topics may be larger; co-partitioned ones must match exactly.
        if have is None or (spec.partitions > 1 and have != spec.partitions):
            raise ConfigError(
                f"topic {spec.name} has {have} partitions, budgetflow expects {spec.partitions} "
                "(BUDGETFLOW_TOPICS__PARTITIONS); partitions cannot change in place, see docs/operations.md, Sizing"
            )


async def _topic_configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, tuple[str | None, int]]]:
    """topic -> config -> (value, source)."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in names])
    configs: dict[str, dict[str, tuple[str | None, int]]] = {}
    for response in responses:
        for error_code, message, _, name, entries in response.resources:
            if error_code:
                _retriable(error_code, message)
                raise ConfigError(f"cannot read the configs of topic {name} (error {error_code}: {message})")
            configs[name] = {entry[0]: (entry[1], entry[3]) for entry in entries}
    return configs


async def _raise_minimums(admin: AIOKafkaAdminClient, spec: TopicSpec, have: dict[str, tuple[str | None, int]]) -> None:
    """Raise configs of an existing topic that are below what budgetflow sets (a changelog made by an older one)."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    low = {
        key: spec.config[key]
        for key in _AT_LEAST
        if key in spec.config and int(have.get(key, ("0", 0))[0] or 0) < int(spec.config[key])
    }
    low.update(
        {
            key: spec.config[key]
            for key in _EXACTLY
            if key in spec.config and have.get(key, (None, 0))[0] != spec.config[key]
        }
    )
    if not low:
        return
    # AlterConfigs sets the topic's whole dynamic config: send the values it has, with the raised ones (and
    # its cleanup policy in any case: a changelog that fell back to the broker's `delete` would lose state).
    dynamic = {key: value for key, (value, source) in have.items() if source == _DYNAMIC_TOPIC_CONFIG}
    dynamic.setdefault("cleanup.policy", have["cleanup.policy"][0])
    command = " ".join(f"--add-config {key}={value}" for key, value in low.items())
    fix = f"kafka-configs.sh --alter --entity-type topics --entity-name {spec.name} {command}"
    if any(value is None for value in dynamic.values()):
        raise ConfigError(f"topic {spec.name} has {_shown(have, low)}, budgetflow needs at least {low}: {fix}")
    try:
        responses = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, spec.name, configs={**dynamic, **low})]
        )
    except KafkaError as exc:
        if exc.retriable:
            raise
        raise ConfigError(f"topic {spec.name} has {_shown(have, low)} and cannot be altered ({exc}): {fix}") from exc
    for response in responses:
        for error_code, message, *_ in response.resources:
            if error_code:
                _retriable(error_code, message)
                raise ConfigError(
                    f"topic {spec.name} has {_shown(have, low)} and cannot be altered "
                    f"(error {error_code}: {message}): {fix}"
                )
    log.warning("topic %s had %s; raised to %s (%s)", spec.name, _shown(have, low), low, spec.holds)


def _retriable(error_code: int, message: str | None) -> None:
    """Raise the broker's error if it is one that passes (a topic just created, a leader moving): not a
    configuration error, so the worker backs off and tries again instead of exiting."""
    error = for_code(error_code)
    if error.retriable:
        raise error(message)


def _shown(have: dict[str, tuple[str | None, int]], keys: dict[str, str]) -> dict[str, str | None]:
    return {key: have.get(key, (None, 0))[0] for key in keys}


async def checkpoint_resumable(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    checkpoint: int,
    delete_retention_ms: int,
    *,
    now_ms: float | None = None,
) -> bool:
    """Whether a store at changelog offset ``checkpoint`` may resume at ``checkpoint + 1``, or must restore all.

    The cleaner removes a tombstone ``delete.retention.ms`` after it first cleaned past it, so no earlier than
    that after it was written. Records written more recently (less a margin for the clocks of the workers that
    wrote them) still have every tombstone; a store may resume if every record after its checkpoint is one of
    them. ``consumer`` is a started AIOKafkaConsumer (it need not be assigned ``tp``).
    """
    now = time.time() * 1000 if now_ms is None else now_ms
    margin = min(delete_retention_ms // 10, 10 * 60_000)
    young_since = int(now - delete_retention_ms + margin)
    found = (await consumer.offsets_for_times({tp: max(young_since, 0)}))[tp]
    # None: no record is that young, so every one is older (the first young one would come at the end).
    first_young = (await consumer.end_offsets([tp]))[tp] if found is None else found.offset
    return bool(checkpoint + 1 >= first_young)


def partition_for(key: str, partitions: int) -> int:
    """The partition a key lands on with Kafka's default partitioner (murmur2, as the Java client)."""
    from aiokafka.partitioner import murmur2

    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


async def ensure_topics_now(settings: Settings, topics: Topics, specs: list[TopicSpec] | None = None) -> str:
    """`ensure_topics` with an admin client of its own; the id of the cluster the topics are on."""
    from budgetflow.streams.kafka.clients import client_options

    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    try:
        await admin.start()  # inside the try: a start that fails still closes the client
        await ensure_topics(admin, topics, specs)
        cluster = await admin.describe_cluster()
        return str(cluster["cluster_id"])
    finally:
        await admin.close()


async def topic_partitions(settings: Settings, topic: str, wait_s: float = 15.0) -> list[int]:
    """The partitions of a topic; waits a little for a topic that was just created."""
    from budgetflow.streams.kafka.clients import client_options

    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    try:
        await admin.start()  # inside the try: a start that fails still closes the client
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
