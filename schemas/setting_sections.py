"""The sections of budgetflow's settings, one pydantic model each (:class:`budgetflow.schemas.settings.Settings`
holds them; docs/operations.md, "Settings", lists every field)."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

__all__ = [
    "ClockSettings",
    "DefaultPolicySettings",
    "DlqSettings",
    "ForecastSettings",
    "LiteLLMSettings",
    "MetricsSettings",
    "NotifySettings",
    "PricingSettings",
    "PublisherSettings",
    "ReservationSettings",
    "Section",
    "StatusSettings",
    "TokenizerRuleSetting",
    "TokenizerSettings",
    "ViewSettings",
    "WebSettings",
    "WorkerSettings",
]

# An origin a stats request may be forwarded to: scheme, host (or *.rest), optional port, nothing else.
_PEER = re.compile(r"^https?://(\*\.)?([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?/?$")


class Section(BaseModel):
    """A section of the settings: unknown keys refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizerRuleSetting(Section):
    """An extra tokenizer rule, tried before the defaults."""

    match: str = Field(min_length=1, max_length=256, description="Model name or glob (case-insensitive).")
    encoding: Literal["o200k_base", "cl100k_base", "heuristic"] = Field(description="How to count it.")
    tier: Literal["exact", "approximate", "heuristic"] = Field("exact", description="Tier of its counts.")


class TokenizerSettings(Section):
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


class ReservationSettings(Section):
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


class PricingSettings(Section):
    """Where prices come from, and what an unpriced model costs."""

    file: Path | None = Field(None, description="Override price file, searched before the shipped table.")
    fallback_input_usd_per_mtok: str | None = Field(
        None, description="Input rate of unpriced cloud models (default: the table's highest)."
    )
    fallback_output_usd_per_mtok: str | None = Field(
        None, description="Output rate of unpriced cloud models (default: the table's highest)."
    )
    local_providers: list[str] = Field(
        default_factory=lambda: [
            *("ollama", "ollama_chat", "vllm", "hosted_vllm", "llamacpp", "llama.cpp", "lmstudio", "lm_studio"),
            *("llamafile", "localai", "tgi", "local"),
        ],
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


class StatusSettings(Section):
    """When a budget's status changes and is published."""

    step_points: Annotated[Decimal, Field(gt=0, le=100)] = Field(
        Decimal(1), description="Publish when utilization crosses a multiple of this many points."
    )
    hysteresis_points: Annotated[Decimal, Field(ge=0, lt=50)] = Field(
        Decimal(1), description="A status drops below a threshold only under threshold minus this."
    )
    refresh_s: float = Field(10.0, gt=0, description="Republish a budget whose spend changed unpublished this long.")


class DefaultPolicySettings(Section):
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


class ClockSettings(Section):
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


class DlqSettings(Section):
    """The dead-letter topic."""

    keep_raw: bool = Field(False, description="Keep bad records unredacted (prompt text!) in the DLQ.")


class WorkerSettings(Section):
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


class ViewSettings(Section):
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
        0.5,
        ge=0,
        description="An admission whose request event's position is not given is taken to be in a status this "
        "much newer than it (with the position, a status says whether it counts it).",
    )
    admit_max_age_s: float = Field(
        60.0,
        gt=0,
        description="An admission whose request event no status has covered is forgotten after this long "
        "(its event was lost, or its position never given).",
    )

    leases: bool = Field(
        True,
        description="Admit cloud spend on leased budgets (a limit whose action blocks, or strict) only against "
        "headroom leased from the aggregate: their cap holds whatever the number of routers.",
    )
    router_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")] | None = Field(
        None, description="This router's name in leases (default: host, process and a random part)."
    )
    lease_ttl_s: int = Field(30, gt=0, le=3600, description="A lease not renewed within this returns to the budget.")
    lease_margin_s: float = Field(
        5.0, ge=0, description="A lease is not used this close to its expiry (its reserves must reach the ledger)."
    )
    lease_horizon_s: float = Field(
        2.0, gt=0, description="A router asks for this long of its recent rate, before its lease runs dry."
    )
    lease_wait_ms: float = Field(
        250.0, ge=0, description="A request its lease cannot cover waits this long for a grant, then is refused."
    )
    lease_min_usd: Annotated[Decimal, Field(ge=0, le=1_000_000)] = Field(
        Decimal("0.01"), description="The least a router asks for."
    )

    @model_validator(mode="after")
    def _order(self) -> ViewSettings:
        if self.expire_after_s < self.stale_after_s:
            raise ValueError("expire_after_s must be at least stale_after_s")
        if self.lease_margin_s >= self.lease_ttl_s:
            raise ValueError("lease_margin_s must be less than lease_ttl_s")
        return self


class PublisherSettings(Section):
    """The gateway-side publisher."""

    on_full: Literal["block", "drop_request", "reject_cloud"] = Field(
        "reject_cloud", description="What a request does when the buffer is full (usage is spooled, never dropped)."
    )
    buffer_max: int = Field(10_000, ge=1, description="Events buffered in memory before on_full applies.")
    spool_max_bytes: int = Field(1 << 30, ge=1 << 16, description="Bound of the usage spool on disk.")
    delivery_timeout_ms: int = Field(15_000, ge=1_000, description="A send not acknowledged by then has failed.")
    linger_ms: int = Field(5, ge=0, description="Producer batching delay.")
    replay_interval_s: float = Field(2.0, gt=0, description="How often spooled usage is retried.")


_MODEL_GROUP = Annotated[str, Field(min_length=1, max_length=256)]


class LiteLLMSettings(Section):
    """The LiteLLM proxy integration (budgetflow.integrations.litellm), in the proxy's environment."""

    local_models: dict[_MODEL_GROUP, _MODEL_GROUP] = Field(
        {},
        description="JSON: a cloud model group -> the local model group its shifted requests go to (cloud stays "
        "their fallback). A model group not listed is never shifted.",
    )
    local_model_groups: list[_MODEL_GROUP] = Field(
        [], description="More model groups that are local (the values of local_models are local already)."
    )
    publish_prompts: bool = Field(
        False,
        description="Publish the prompt text on request events (enrich counts its tokens); else only its size in "
        "bytes, reserved by the byte rule.",
    )
    unmetered_calls: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        [],
        description='JSON: LiteLLM call types let through uncounted (e.g. ["aembedding"]; ["*"]: all). Any other '
        "call the integration does not meter (it meters chat completions) is refused with a 400.",
    )
    ready_timeout_s: float = Field(
        30.0, gt=0, description="How long the first request waits for the budget view to catch up (then stale rules)."
    )
    call_ttl_s: float = Field(
        3600.0, gt=0, description="A request whose usage never came is forgotten after this (its reserve expires)."
    )

    @model_validator(mode="after")
    def _not_both(self) -> LiteLLMSettings:
        both = sorted(set(self.local_models) & ({*self.local_models.values()} | {*self.local_model_groups}))
        if both:
            raise ValueError(f"model group {both[0]!r} cannot be both cloud and local")
        return self


class WebSettings(Section):
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


class NotifySettings(Section):
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


class MetricsSettings(Section):
    """Prometheus metrics."""

    port: int = Field(
        9108,
        ge=0,
        le=65535,
        description="Port of the enrich worker's /metrics (the aggregate serves /metrics on WEB__PORT).",
    )
    max_budgets: int = Field(1000, ge=1, description="Budgets exported per worker (those with a policy, by name).")


class ForecastSettings(Section):
    """The burn-rate forecast."""

    window_s: float = Field(6 * 3600.0, gt=0, description="Time constant of the smoothed burn rate.")
    sample_s: float = Field(60.0, gt=0, description="Stream time between two samples of a partition's spend.")
