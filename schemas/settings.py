"""All of budgetflow's settings, in one pydantic-settings model.

Every field is read from the environment with the prefix ``BUDGETFLOW_`` and
``__`` between nested sections: ``kafka.bootstrap_servers`` is
``BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS``. Units are in the names. docs/operations.md
table and the Helm values are generated from :func:`setting_rows`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.serde import first_error

__all__ = [
    "ENV_PREFIX",
    "ClockSettings",
    "DefaultPolicySettings",
    "DlqSettings",
    "ForecastSettings",
    "KafkaSettings",
    "LocalKafkaSettings",
    "MetricsSettings",
    "PricingSettings",
    "PublisherSettings",
    "ReservationSettings",
    "SecuritySettings",
    "Settings",
    "StatusSettings",
    "TokenizerSettings",
    "TopicSettings",
    "ViewSettings",
    "WebSettings",
    "WorkerSettings",
    "env_name",
    "load_settings",
    "setting_rows",
    "settings_from_env",
]

ENV_PREFIX = "BUDGETFLOW_"
NESTING = "__"
# Variables under this prefix belong to the test harness, not to Settings.
TEST_ENV_PREFIX = "BUDGETFLOW_TEST_"
# Variables that back command-line options rather than settings (the CLI lists them in --help).
COMMAND_ENV = frozenset(
    {
        "BUDGETFLOW_ROLE",
        "BUDGETFLOW_VIEW_PORT",
        "BUDGETFLOW_VIEW_HOST",
        "BUDGETFLOW_BENCH_QUICK",
        "BUDGETFLOW_BENCH_BOOTSTRAP",
        "BUDGETFLOW_DEMO_DURATION_S",
    }
)

_HOST_PORT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")
_TOPIC_CHARS = re.compile(r"^[A-Za-z0-9._\-]*$")
# An origin a stats request may be forwarded to: scheme, host (or *.rest), optional port, nothing else.
_PEER = re.compile(r"^https?://(\*\.)?([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?/?$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecuritySettings(_Section):
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


class KafkaSettings(_Section):
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


class TopicSettings(_Section):
    """Topic names and sizes."""

    prefix: str = Field("budgetflow.", description="Prefix of every topic name.")
    partitions: int = Field(
        8, ge=1, le=1024, description="Partitions of the input and ledger topics (fixed once created)."
    )
    replication_factor: int = Field(1, ge=1, le=16, description="Replication factor of created topics.")
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
        return self

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _TOPIC_CHARS.match(value) or len(value) > 180:
            raise ValueError("may hold only letters, digits, '.', '_' and '-' (at most 180)")
        return value


class LocalKafkaSettings(_Section):
    """The local development broker started by ``budgetflow kafka start``."""

    version: str = Field("4.1.1", description="Apache Kafka version fetched from Maven Central.")
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Client port on 127.0.0.1: 0 picks a free one; unset means 9092, or the port used last time.",
    )
    heap_mb: int = Field(512, ge=128, description="JVM heap of the broker.")
    jvm_gc: Literal["serial", "g1"] = Field("serial", description="JVM garbage collector (g1 for benchmarks).")
    start_timeout_s: float = Field(90.0, gt=0, description="How long to wait for the broker to become ready.")
    stop_timeout_s: float = Field(30.0, gt=0, description="How long a controlled shutdown may take before SIGKILL.")
    cache_dir: Path | None = Field(
        None, description="Where the broker jars are kept (default: $XDG_CACHE_HOME/budgetflow)."
    )


class TokenizerRuleSetting(_Section):
    """An extra tokenizer rule, tried before the defaults."""

    match: str = Field(min_length=1, max_length=256, description="Model name or glob (case-insensitive).")
    encoding: Literal["o200k_base", "cl100k_base", "heuristic"] = Field(description="How to count it.")
    tier: Literal["exact", "approximate", "heuristic"] = Field("exact", description="Tier of its counts.")


class TokenizerSettings(_Section):
    """How tokens are counted."""

    rules: list[TokenizerRuleSetting] = Field(
        default_factory=list,
        description='Extra rules tried first, as JSON: [{"match": "my-gpt-*", "encoding": "o200k_base"}].',
    )
    max_prompt_bytes: int = Field(
        1_000_000, ge=1_024, description="Prompts longer than this are counted by the heuristic on their length."
    )


def _margin(value: str) -> str:
    try:
        number = Decimal(value)
    except InvalidOperation as exc:
        raise ValueError("must be a decimal such as 1.2") from exc
    if not number.is_finite() or not Decimal(1) <= number <= Decimal(10) or -number.as_tuple().exponent > 6:  # type: ignore[operator]  # exponent is an int for finite decimals
        raise ValueError("must be a decimal between 1 and 10 with at most 6 decimals")
    return value


Margin = Annotated[str, AfterValidator(_margin)]


def _reservation_cap(value: str) -> str:
    from budgetflow.schemas.money import MAX_ENTRY_PICO, parse_usd

    pico = parse_usd(value, what="the cap")
    if not 0 < pico <= MAX_ENTRY_PICO:
        raise ValueError("must be a USD amount above 0 and at most 1000000")
    return value


ReservationCap = Annotated[str, AfterValidator(_reservation_cap)]


class ReservationSettings(_Section):
    """How a request's cost is reserved before its usage is known."""

    ttl_s: int = Field(
        3600, gt=0, le=7 * 86400, description="A reservation not settled within this expires at its estimate."
    )
    default_output_tokens: int = Field(
        1024, ge=0, description="Output tokens reserved when a request sets no max_tokens (capped by the model)."
    )
    margin_exact: Margin = Field("1.0", description="Reservation multiplier for exactly counted input.")
    margin_approximate: Margin = Field("1.2", description="Reservation multiplier for approximately counted input.")
    margin_heuristic: Margin = Field("1.0", description="Reservation multiplier for heuristically counted input.")
    max_unpriced_usd: ReservationCap = Field(
        "10.00", description="Most reserved for one call of an unpriced model (the fallback price is a guess)."
    )


class PricingSettings(_Section):
    """Where prices come from, and what an unpriced model costs."""

    file: Path | None = Field(None, description="Override price file, searched before the shipped table.")
    fallback_input_usd_per_mtok: str | None = Field(
        None, description="Input rate of unpriced cloud models (default: the table's highest)."
    )
    fallback_output_usd_per_mtok: str | None = Field(
        None, description="Output rate of unpriced cloud models (default: the table's highest)."
    )
    local_providers: list[str] = Field(
        default_factory=lambda: ["ollama", "vllm", "llamacpp", "llama.cpp", "lmstudio", "localai", "tgi", "local"],
        description="Providers whose backend=local calls of unlisted models cost nothing.",
    )
    trust_reported_cost: list[str] = Field(
        default_factory=list, description="Providers whose usage events' reported_cost_usd is taken as the cost."
    )
    reload_s: float = Field(
        30.0, ge=0, description="How often enrich checks the override file and reloads it if it changed (0: never)."
    )

    @field_validator("file")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value


class StatusSettings(_Section):
    """When a budget's status changes and is published."""

    step_points: Annotated[Decimal, Field(gt=0, le=100)] = Field(
        Decimal(1), description="Publish when utilization crosses a multiple of this many points."
    )
    hysteresis_points: Annotated[Decimal, Field(ge=0, lt=50)] = Field(
        Decimal(1), description="A status drops below a threshold only under threshold minus this."
    )
    refresh_s: float = Field(10.0, gt=0, description="Republish a budget whose spend changed unpublished this long.")


class DefaultPolicySettings(_Section):
    """The policy of a budget that has none of its own."""

    monthly_limit_usd: str | None = Field(None, description="Decimal string; unset means unlimited.")
    soft_limit_percent: int = Field(75, gt=0, lt=100, description="Soft limit, percent of the monthly limit.")
    hard_limit_action: Literal["warn", "block_cloud", "block_all"] = Field(
        "warn", description="What routers do at the hard limit."
    )

    @field_validator("monthly_limit_usd")
    @classmethod
    def _limit(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                number = Decimal(value)
            except InvalidOperation as exc:
                raise ValueError("must be a decimal string such as 100.00") from exc
            if not number.is_finite() or number < 0 or number != round(number, 12):
                raise ValueError("must be a non-negative decimal with at most 12 decimals")
        return value


class ClockSettings(_Section):
    """A simulated clock for tests and the demo (refused unless BUDGETFLOW_TESTING is set)."""

    start: datetime | None = Field(None, description="Simulated instant at the anchor (RFC 3339); unset: wall clock.")
    anchor: datetime | None = Field(
        None, description="Wall-clock instant the simulated start maps to (default: when the process starts)."
    )
    speed: float = Field(1.0, gt=0, le=10_000_000, description="Simulated seconds per wall-clock second.")

    @field_validator("start", "anchor")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a UTC offset")
        return value


class DlqSettings(_Section):
    """The dead-letter topic."""

    keep_raw: bool = Field(False, description="Keep bad records unredacted (prompt text!) in the DLQ.")


class WorkerSettings(_Section):
    """How the enrich and aggregate workers consume and commit."""

    max_batch_records: int = Field(5000, ge=1, description="Most records taken per processing cycle.")
    poll_timeout_ms: int = Field(50, ge=1, le=10_000, description="Longest wait for records in one cycle.")
    expiry_max_lag_records: int = Field(
        10_000, ge=0, description="Reservations expire on a tick only while the ledger backlog is below this."
    )
    sweep_keys_per_tick: int = Field(20_000, ge=1, description="Expired request states examined per tick.")
    store: Literal["rocksdb", "memory"] = Field(
        "rocksdb", description="Aggregate state store: rocksdb (restart replays the tail) or memory (replays all)."
    )
    shutdown_timeout_s: float = Field(
        20.0, gt=0, le=600, description="Longest a worker takes to stop after SIGTERM, whatever the broker does."
    )


class ViewSettings(_Section):
    """How a router's BudgetView treats old news."""

    stale_after_s: float = Field(
        30.0, gt=0, description="A budget is stale when its partition's heartbeat is older or reports more lag."
    )
    expire_after_s: float = Field(300.0, gt=0, description="Past this, a stale budget follows stale_mode.")
    stale_mode: Literal["open", "closed"] = Field(
        "open", description="open: an expired budget reads as normal; closed: as hard-limited, blocking cloud."
    )
    follow_policies: bool = Field(
        True, description="Follow the policies too, so decisions apply scoped and parent budgets as enrich charges."
    )
    admit_grace_s: float = Field(
        0.5, ge=0, description="A status this much newer than an admission is taken to include it."
    )
    admit_max_age_s: float = Field(60.0, gt=0, description="Admissions older than this are forgotten.")

    @model_validator(mode="after")
    def _order(self) -> ViewSettings:
        if self.expire_after_s < self.stale_after_s:
            raise ValueError("expire_after_s must be at least stale_after_s")
        return self


class PublisherSettings(_Section):
    """The gateway-side publisher."""

    on_full: Literal["block", "drop_request", "reject_cloud"] = Field(
        "reject_cloud", description="What a request does when the buffer is full (usage is spooled, never dropped)."
    )
    buffer_max: int = Field(10_000, ge=1, description="Events buffered in memory before on_full applies.")
    spool_max_bytes: int = Field(1 << 30, ge=1 << 16, description="Bound of the usage spool on disk.")
    delivery_timeout_ms: int = Field(15_000, ge=1_000, description="A send not acknowledged by then has failed.")
    linger_ms: int = Field(5, ge=0, description="Producer batching delay.")
    replay_interval_s: float = Field(2.0, gt=0, description="How often spooled usage is retried.")


class WebSettings(_Section):
    """The HTTP endpoints of the workers (stats API, health, metrics) and of `budgetflow view serve`."""

    host: str = Field(
        "127.0.0.1", description="Interface of the stats API and of enrich's /metrics (the Helm chart sets 0.0.0.0)."
    )
    port: int = Field(8085, ge=0, le=65535, description="Port of the aggregate's stats API (0 picks a free one).")
    advertised_url: str | None = Field(
        None, description="URL other workers use to reach this one (default http://<hostname>:<port>)."
    )
    bearer_token: SecretStr | None = Field(None, description="If set, the stats API requires this bearer token.")
    peers: list[str] = Field(
        default_factory=list,
        description='Origins a stats request may be forwarded to, as JSON: ["http://*.agg.ns.svc:8085"] '
        "(* is one DNS label); a budget held by a worker not listed answers 503.",
    )
    peer_token: SecretStr | None = Field(
        None,
        description="Token workers present to each other when forwarding (required with PEERS and a "
        "BEARER_TOKEN; not the same token).",
    )

    @field_validator("peers")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for peer in value:
            if not _PEER.match(peer):
                raise ValueError(f"{peer!r} is not an origin like http://host:port (a leading *. stands for one label)")
        return value

    @model_validator(mode="after")
    def _peer_credential(self) -> WebSettings:
        if self.bearer_token is not None and self.peers and self.peer_token is None:
            raise ValueError("BUDGETFLOW_WEB__PEER_TOKEN is required when WEB__PEERS and WEB__BEARER_TOKEN are set")
        return self


class NotifySettings(_Section):
    """`budgetflow notify`: each budget transition posted once to a webhook (Slack-compatible JSON)."""

    webhook_url: SecretStr | None = Field(None, description="Where to POST (secret: a Slack URL is a credential).")
    timeout_s: float = Field(10.0, gt=0, le=300, description="Timeout of one POST.")
    max_backoff_s: float = Field(60.0, ge=0.1, le=3600, description="Longest wait between two retries of a POST.")

    @field_validator("webhook_url")
    @classmethod
    def _http(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


class MetricsSettings(_Section):
    """Prometheus metrics."""

    port: int = Field(
        9108,
        ge=0,
        le=65535,
        description="Port of the enrich worker's /metrics (the aggregate serves /metrics on WEB__PORT).",
    )
    max_budgets: int = Field(1000, ge=1, description="Budgets exported per worker (those with a policy, by name).")


class ForecastSettings(_Section):
    """The burn-rate forecast."""

    window_s: float = Field(6 * 3600.0, gt=0, description="Time constant of the smoothed burn rate.")
    sample_s: float = Field(60.0, gt=0, description="Stream time between two samples of a partition's spend.")


class Settings(BaseSettings):
    """budgetflow's settings; docs/operations.md ("Settings") has the table of environment variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTING,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    data_dir: Path = Field(Path(".budgetflow"), description="Local state: broker data, worker stores, spool.")
    testing: bool = Field(False, description="Allows test-only settings such as the simulated clock.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level of the workers.")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    local_kafka: LocalKafkaSettings = Field(default_factory=LocalKafkaSettings)
    tokenizers: TokenizerSettings = Field(default_factory=TokenizerSettings)
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    reservation: ReservationSettings = Field(default_factory=ReservationSettings)
    dedupe_horizon_s: int = Field(
        86_400, ge=60, description="A request's state is kept this long after its TTL, then later entries are late."
    )
    period_grace_s: int = Field(7 * 86_400, ge=0, description="A month stays open this long after it ends.")
    unknown_budget: Literal["default", "ignore", "dlq"] = Field(
        "default",
        description="A budget id with no policy: charged under the default policy, dropped, or the "
        "event goes to the DLQ as unknown_budget.",
    )
    max_clock_skew_s: int = Field(
        300, ge=0, description="An event stamped further in the future than this goes to the DLQ as future."
    )
    heartbeat_s: float = Field(5.0, gt=0, description="Interval of ticks and heartbeats per ledger partition.")
    status: StatusSettings = Field(default_factory=StatusSettings)
    default_policy: DefaultPolicySettings = Field(default_factory=DefaultPolicySettings)
    clock: ClockSettings = Field(default_factory=ClockSettings)
    dlq: DlqSettings = Field(default_factory=DlqSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    view: ViewSettings = Field(default_factory=ViewSettings)
    publisher: PublisherSettings = Field(default_factory=PublisherSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    forecast: ForecastSettings = Field(default_factory=ForecastSettings)

    @model_validator(mode="after")
    def _testing_only(self) -> Settings:
        if not self.testing and (self.clock.start is not None or self.clock.speed != 1.0):
            raise ValueError(
                "BUDGETFLOW_CLOCK__START and BUDGETFLOW_CLOCK__SPEED are refused unless BUDGETFLOW_TESTING is set"
            )
        return self


def env_name(loc: tuple[str | int, ...]) -> str:
    """The environment variable behind a settings field path, e.g. ``('kafka', 'client_id')``."""
    return ENV_PREFIX + NESTING.join(str(part).upper() for part in loc)


def _fields(model: type[BaseModel], loc: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, (*loc, name))
        else:
            yield (*loc, name), info


def setting_rows() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every leaf setting."""
    rows = []
    for loc, info in _fields(Settings):
        default = info.get_default(call_default_factory=True)
        shown = "" if default is None else str(default)
        rows.append((env_name(loc), shown, info.description or ""))
    return rows


def _unknown_env(environ: Mapping[str, str]) -> list[str]:
    known = {env_name(loc) for loc, _ in _fields(Settings)}
    sections = {env_name(loc[:i]) for loc, _ in _fields(Settings) for i in range(1, len(loc))}
    return sorted(
        name
        for name in environ
        if name.startswith(ENV_PREFIX)
        and not name.startswith(TEST_ENV_PREFIX)
        and name not in COMMAND_ENV
        and name not in known
        and name not in sections
    )


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment (and keyword overrides).

    Raises :class:`ConfigError` with one line naming the variable at fault:
    a typo in a ``BUDGETFLOW_`` variable is an error, not silently ignored.
    """
    unknown = _unknown_env(os.environ)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]} (see `budgetflow settings` for the list)")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        at, message, more = first_error(exc)
        loc = tuple(part for part in at if isinstance(part, str))
        where = f"invalid setting {env_name(loc)}" if loc else "invalid settings"
        raise ConfigError(f"{where}: {message}{more}") from exc


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """The settings a child process started with ``env`` will read (its ``BUDGETFLOW_`` variables), read here.

    The variables are put in this process's environment for the read and restored afterwards.
    """
    values = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        return load_settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
