"""The Kafka sections of budgetflow's settings: the brokers, their security, the topics and the local development
broker (docs/operations.md, "Settings")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from budgetflow.schemas.setting_sections import Section

__all__ = ["KafkaSettings", "LocalKafkaSettings", "SecuritySettings", "TopicSettings"]

_HOST_PORT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")
_TOPIC_CHARS = re.compile(r"^[A-Za-z0-9._\-]*$")


class SecuritySettings(Section):
    """How clients authenticate to Kafka: TLS and SASL."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism, required with SASL_* protocols."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (secret).")
    ssl_cafile: Path | None = Field(None, description="CA bundle that signs the brokers' certificates.")
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client private key for mutual TLS.")
    ssl_key_password: SecretStr | None = Field(None, description="Password of the client key (secret).")
    ssl_check_hostname: bool = Field(True, description="Verify the broker's host name against its certificate.")

    @model_validator(mode="after")
    def _complete(self) -> SecuritySettings:
        if self.protocol.startswith("SASL_"):
            missing = [
                name
                for name, value in (
                    ("sasl_mechanism", self.sasl_mechanism),
                    ("sasl_username", self.sasl_username),
                    ("sasl_password", self.sasl_password),
                )
                if value is None
            ]
            if missing:
                raise ValueError(f"protocol {self.protocol} needs {', '.join(missing)}")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} is not a readable file")
        return self


class KafkaSettings(Section):
    """How to reach the Kafka cluster."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    client_id: str = Field("budgetflow", description="Client id sent to the brokers.")
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    request_timeout_ms: int = Field(30_000, ge=1_000, description="Client request timeout.")
    session_timeout_ms: int = Field(
        10_000, ge=3_000, description="Consumer group session timeout: how soon a dead worker's partitions move."
    )
    heartbeat_interval_ms: int = Field(3_000, ge=100, description="Consumer group heartbeat interval.")

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        servers = [part.strip() for part in value.split(",")]
        bad = [s for s in servers if not _HOST_PORT.match(s) or not 0 < int(s.rsplit(":", 1)[1]) < 65536]
        if not servers or bad:
            raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return ",".join(servers)

    @model_validator(mode="after")
    def _heartbeat(self) -> KafkaSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        return self


class TopicSettings(Section):
    """Topic names and sizes."""

    prefix: str = Field("budgetflow.", description="Prefix of every topic name.")
    partitions: int = Field(
        8, ge=1, le=1024, description="Partitions of the input and ledger topics (fixed once created)."
    )
    replication_factor: int = Field(1, ge=1, le=16, description="Replication factor of created topics.")
    min_insync_replicas: int | None = Field(
        None,
        ge=1,
        le=16,
        description="min.insync.replicas of created topics when replicated (default: one less than the factor).",
    )
    requests_retention_ms: int = Field(
        3_600_000, ge=1_000, description="How long the requests topic (it holds prompt text) keeps records."
    )
    requests_segment_ms: int = Field(
        600_000, ge=1_000, description="Segment roll of the requests topic: retention deletes whole segments only."
    )

    @model_validator(mode="after")
    def _segments(self) -> TopicSettings:
        if self.requests_segment_ms > self.requests_retention_ms:
            raise ValueError("requests_segment_ms must not exceed requests_retention_ms, or records outlive it")
        if self.min_insync_replicas is not None and self.min_insync_replicas > self.replication_factor:
            raise ValueError("min_insync_replicas above replication_factor: no acks=all write could succeed")
        return self

    @property
    def insync_replicas(self) -> int:
        """The min.insync.replicas of replicated topics: as set, else one replica may be down (2 of 3)."""
        if self.min_insync_replicas is not None:
            return self.min_insync_replicas
        return max(1, self.replication_factor - 1)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _TOPIC_CHARS.match(value) or len(value) > 180:
            raise ValueError("may hold only letters, digits, '.', '_' and '-' (at most 180)")
        return value


class LocalKafkaSettings(Section):
    """The local development broker started by ``budgetflow kafka start``."""

    version: str = Field("4.1.1", description="Apache Kafka version fetched from Maven Central.")
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Client port on 127.0.0.1: 0 picks a free one; unset means 9092, or the port used last time.",
    )
    heap_mb: int = Field(512, ge=128, description="JVM heap of the broker.")
    node_heap_mb: int = Field(
        320, ge=128, description="JVM heap of each node of a local cluster (`budgetflow kafka start --brokers 3`)."
    )
    jvm_gc: Literal["serial", "g1"] = Field("serial", description="JVM garbage collector (g1 for benchmarks).")
    start_timeout_s: float = Field(90.0, gt=0, description="How long to wait for the broker to become ready.")
    stop_timeout_s: float = Field(30.0, gt=0, description="How long a controlled shutdown may take before SIGKILL.")
    cache_dir: Path | None = Field(
        None, description="Where the broker jars are kept (default: $XDG_CACHE_HOME/budgetflow)."
    )
