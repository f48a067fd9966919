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

__all__ = ["BrokerState", "admin_options", "jvm_flags", "new_cluster_id", "server_properties"]


@dataclass(frozen=True)
class BrokerState:
    """What a data dir remembers between starts (its ``state.json``)."""

    cluster_id: str
    port: int
    controller_port: int
    secure_dir: str | None = None


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes as URL-safe base64 without padding."""
    # KRaft rejects a leading '-', which the command line would read as a flag.
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def server_properties(state: BrokerState, log_dir: Path) -> str:
    """``server.properties`` of a single-node KRaft broker on 127.0.0.1, tuned for tests and the demo."""
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{state.controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{state.port},CONTROLLER://127.0.0.1:{state.controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{state.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        # Single node: every internal topic has one replica.
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
    if state.secure_dir:
        props.update(SecureDir(Path(state.secure_dir)).server_properties(state.port, state.controller_port))
    return "".join(f"{key}={value}\n" for key, value in props.items())


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
