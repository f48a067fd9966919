"""The local broker's configuration: its state file's record, ``server.properties``, the JVM's flags and the
admin client options that reach it (pure: writing them and running the JVM is `LocalKafka`'s)."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from budgetflow.schemas.settings import LocalKafkaSettings
from budgetflow.streams.dev.securekafka import SecureDir

__all__ = ["BrokerState", "ClusterLayout", "admin_options", "jvm_flags", "new_cluster_id", "server_properties"]


@dataclass(frozen=True)
class BrokerState:
    """What a data dir remembers between starts (its ``state.json``)."""

    cluster_id: str
    port: int
    controller_port: int
    secure_dir: str | None = None


@dataclass(frozen=True)
class ClusterLayout:
    """What a local cluster's dir remembers (its ``cluster.json``): one cluster id and each node's two ports.

    The ports are fixed when the cluster is first started: every node names every controller in its
    ``controller.quorum.voters``, so one node cannot move without the others being told.
    """

    cluster_id: str
    ports: tuple[tuple[int, int], ...]  # (client port, controller port) of node 1, 2, ...

    @property
    def size(self) -> int:
        return len(self.ports)

    @property
    def replication_factor(self) -> int:
        """Replicas of the internal topics (and the broker's default): every node, at most three."""
        return min(3, self.size)

    @property
    def min_insync_replicas(self) -> int:
        """One replica may be down and acks=all writes still succeed (two of three)."""
        return max(1, self.replication_factor - 1)

    def state(self, node_id: int) -> BrokerState:
        port, controller_port = self.ports[node_id - 1]
        return BrokerState(self.cluster_id, port, controller_port)

    def voters(self) -> str:
        return ",".join(f"{i}@127.0.0.1:{controller}" for i, (_, controller) in enumerate(self.ports, start=1))

    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port, _ in self.ports)


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes as URL-safe base64 without padding."""
    # KRaft rejects a leading '-', which the command line would read as a flag.
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def server_properties(state: BrokerState, log_dir: Path, layout: ClusterLayout | None = None, node_id: int = 1) -> str:
    """``server.properties`` of a KRaft broker on 127.0.0.1, tuned for tests and the demo: a single node, or node
    ``node_id`` of the local cluster ``layout`` (each node a broker and a controller)."""
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": layout.voters() if layout else f"1@127.0.0.1:{state.controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{state.port},CONTROLLER://127.0.0.1:{state.controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{state.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        # Single node: every internal topic has one replica (a cluster's are set by _replicated).
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # An auto-created compacted topic would silently be a delete topic.
        "auto.create.topics.enable": "false",
        # Lets clients use short session timeouts, so a killed worker's partitions move in seconds.
        "group.min.session.timeout.ms": "3000",
        "log.retention.check.interval.ms": "5000",
        "log.cleaner.backoff.ms": "1000",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "background.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
        "log.cleaner.threads": "1",
    }
    if layout is not None:
        props.update(_replicated(layout))
    if state.secure_dir:
        props.update(SecureDir(Path(state.secure_dir)).server_properties(state.port, state.controller_port))
    return "".join(f"{key}={value}\n" for key, value in props.items())


def _replicated(layout: ClusterLayout) -> dict[str, str]:
    """A cluster's replicas: the internal topics on every node (at most three) and writes with acks=all that
    survive one node down; a node that stops heartbeating is fenced, and its partitions led elsewhere, in seconds
    (Kafka's 9 s would stall a fault test's writes for as long)."""
    factor, isr = str(layout.replication_factor), str(layout.min_insync_replicas)
    return {
        "offsets.topic.replication.factor": factor,
        "transaction.state.log.replication.factor": factor,
        "transaction.state.log.min.isr": isr,
        "share.coordinator.state.topic.replication.factor": factor,
        "share.coordinator.state.topic.min.isr": isr,
        "default.replication.factor": factor,
        "min.insync.replicas": isr,
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "4000",
        "replica.lag.time.max.ms": "10000",
    }


def jvm_flags(settings: LocalKafkaSettings, home: Path) -> list[str]:
    """The broker JVM's heap, collector and logging, for the data dir ``home``."""
    heap = settings.heap_mb
    gc = ["-XX:+UseSerialGC"] if settings.jvm_gc == "serial" else ["-XX:+UseG1GC"]
    return [
        f"-Xms{min(256, heap)}m",
        f"-Xmx{heap}m",
        *gc,
        "-Djava.net.preferIPv4Stack=true",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={home / 'logs'}",
    ]


def admin_options(state: BrokerState) -> dict[str, Any]:
    """The admin client's security options for this broker (none on a plaintext one), without its address."""
    if not state.secure_dir:
        return {}
    from budgetflow.schemas.settings import KafkaSettings
    from budgetflow.streams.kafka.clients import client_options

    secure = SecureDir(Path(state.secure_dir))
    env = secure.env("admin", f"127.0.0.1:{state.port}")
    security = {
        k.removeprefix("BUDGETFLOW_KAFKA__SECURITY__").lower(): v
        for k, v in env.items()
        if k.startswith("BUDGETFLOW_KAFKA__SECURITY__")
    }
    options = client_options(KafkaSettings(security=security))  # type: ignore[arg-type]
    for key in ("bootstrap_servers", "request_timeout_ms", "client_id"):
        options.pop(key)
    return options
