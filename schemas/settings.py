"""All of budgetflow's settings, in one pydantic-settings model.

Every field is read from the environment with the prefix ``BUDGETFLOW_`` and
``__`` between nested sections: ``kafka.bootstrap_servers`` is
``BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS``. Units are in the names. docs/operations.md
table and the Helm values are generated from :func:`setting_rows`.
"""

from __future__ import annotations

import json
import os
import re
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.kafka_settings import KafkaSettings, LocalKafkaSettings, SecuritySettings, TopicSettings
from budgetflow.schemas.serde import first_error
from budgetflow.schemas.setting_sections import (
    ClockSettings,
    DefaultPolicySettings,
    DlqSettings,
    ForecastSettings,
    LiteLLMSettings,
    MetricsSettings,
    NotifySettings,
    PricingSettings,
    PublisherSettings,
    ReservationSettings,
    StatusSettings,
    TokenizerSettings,
    ViewSettings,
    WebSettings,
    WorkerSettings,
)

__all__ = [
    "ENV_PREFIX",
    "ClockSettings",
    "DefaultPolicySettings",
    "DlqSettings",
    "ForecastSettings",
    "KafkaSettings",
    "LiteLLMSettings",
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
    global_shards: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Shards of the global budget when its policy names none (docs/architecture.md, 'Hot budgets'); "
        "empty: 1 below 24 ledger partitions, else one per 8.",
    )
    heartbeat_s: float = Field(5.0, gt=0, description="Interval of ticks and heartbeats per ledger partition.")
    status: StatusSettings = Field(default_factory=StatusSettings)
    default_policy: DefaultPolicySettings = Field(default_factory=DefaultPolicySettings)
    clock: ClockSettings = Field(default_factory=ClockSettings)
    dlq: DlqSettings = Field(default_factory=DlqSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    view: ViewSettings = Field(default_factory=ViewSettings)
    publisher: PublisherSettings = Field(default_factory=PublisherSettings)
    litellm: LiteLLMSettings = Field(default_factory=LiteLLMSettings)
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
    except SettingsError as exc:  # a complex setting (a list, a map) whose value is not JSON
        field = re.search(r'field "([^"]+)"', str(exc))
        section = ENV_PREFIX + (field[1].upper() if field else "")
        named = sorted(k for k, v in os.environ.items() if k.startswith(section) and _complex(k) and not _is_json(v))
        where = f"invalid setting {named[0]}" if named else "invalid settings"
        raise ConfigError(f"{where}: not valid JSON (lists and maps are written as JSON)") from exc


def _complex(variable: str) -> bool:
    """Whether a BUDGETFLOW_ variable sets a list or a map (read as JSON)."""
    model: Any = Settings
    annotation: Any = None
    for part in variable[len(ENV_PREFIX) :].lower().split("__"):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        annotation = field.annotation
        model = annotation
    return typing.get_origin(annotation) in (list, dict)


def _is_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


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
