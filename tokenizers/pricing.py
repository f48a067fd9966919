"""Model prices, exact to the pico-dollar.

A price file (the shipped table and an operator's override share one format)
lists models by exact name or glob. The override is searched first; within a
file a cloud entry beats a local one (a priced cloud model is never made free
by an event calling it local), then an entry of the event's own provider, then
an exact name beats a glob and the longest glob wins. Rates have at most 6 decimals in
USD per million tokens, so each per-token rate is a whole number of
pico-dollars and every cost is an exact integer.
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from budgetflow.schemas.errors import ConfigError, InvalidEvent
from budgetflow.schemas.events import Backend, Timestamp
from budgetflow.schemas.money import UsdRate, parse_rate
from budgetflow.schemas.serde import validation_message
from budgetflow.schemas.settings import PricingSettings

__all__ = ["DEFAULT_LOCAL_PROVIDERS", "Cost", "Price", "PriceEntry", "PriceFile", "PriceTable"]

DEFAULT_LOCAL_PROVIDERS = (
    *("ollama", "ollama_chat", "vllm", "hosted_vllm", "llamacpp", "llama.cpp", "lmstudio", "lm_studio"),
    *("llamafile", "localai", "tgi", "local"),
)
_SHIPPED = "prices.yaml"


class PriceEntry(BaseModel):
    """One model's prices as written in a price file (USD per million tokens)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    aliases: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = []
    provider: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    backend: Backend = "cloud"
    input_usd_per_mtok: UsdRate
    cached_input_usd_per_mtok: UsdRate | None = None
    cache_write_input_usd_per_mtok: UsdRate | None = None
    output_usd_per_mtok: UsdRate
    reasoning_usd_per_mtok: UsdRate | None = None
    max_output_tokens: Annotated[int, Field(gt=0, le=10_000_000)] | None = None
    reservation_ttl_s: Annotated[int, Field(gt=0, le=7 * 86400)] | None = None
    source: Annotated[str, StringConstraints(max_length=1024)] = ""
    # From this instant on (RFC 3339, UTC) the entry prices calls whose request happened then or later; an entry
    # for the same model with a later valid_from replaces it from that instant. Absent: since always.
    valid_from: Timestamp | None = None


class PriceFile(BaseModel):
    """A price file: when it was read, and its models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    as_of: Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$")]
    models: list[PriceEntry]


@dataclass(frozen=True)
class Price:
    """Per-token rates in pico-dollars, resolved for one model (local entries are all zero)."""

    match: str
    provider: str
    backend: Backend
    input: int
    cached_input: int
    cache_write_input: int
    output: int
    reasoning: int
    max_output_tokens: int | None
    reservation_ttl_s: int | None
    priced: bool
    version: str

    @classmethod
    def from_entry(cls, entry: PriceEntry, version: str) -> Price:
        if entry.valid_from is not None:
            version = f"{version}@{entry.valid_from.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        if entry.backend == "local":
            zero = 0
            return cls(
                entry.match,
                entry.provider,
                "local",
                zero,
                zero,
                zero,
                zero,
                zero,
                entry.max_output_tokens,
                entry.reservation_ttl_s,
                True,
                version,
            )
        return cls(
            match=entry.match,
            provider=entry.provider,
            backend="cloud",
            input=entry.input_usd_per_mtok,
            cached_input=_or(entry.cached_input_usd_per_mtok, entry.input_usd_per_mtok),
            cache_write_input=_or(entry.cache_write_input_usd_per_mtok, entry.input_usd_per_mtok),
            output=entry.output_usd_per_mtok,
            reasoning=_or(entry.reasoning_usd_per_mtok, entry.output_usd_per_mtok),
            max_output_tokens=entry.max_output_tokens,
            reservation_ttl_s=entry.reservation_ttl_s,
            priced=True,
            version=version,
        )

    def cost(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_input_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> int:
        """The cost formula (docs/architecture.md, "Prices"), in integer pico-dollars."""
        plain_input = input_tokens - cached_input_tokens - cache_write_input_tokens
        plain_output = output_tokens - reasoning_tokens
        if (
            plain_input < 0
            or plain_output < 0
            or min(cached_input_tokens, cache_write_input_tokens, reasoning_tokens) < 0
        ):
            raise InvalidEvent(
                "usage_rule", "usage breaks the rule: cached + cache_write ≤ input, reasoning ≤ output, all ≥ 0"
            )
        return (
            plain_input * self.input
            + cached_input_tokens * self.cached_input
            + cache_write_input_tokens * self.cache_write_input
            + plain_output * self.output
            + reasoning_tokens * self.reasoning
        )


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


class Cost(NamedTuple):
    """What a call cost, whether a real price was found, and the price that was used."""

    pico_usd: int
    priced: bool
    backend: Backend
    price_version: str


@dataclass(frozen=True)
class _LoadedFile:
    entries: tuple[PriceEntry, ...]
    version: str


def _read_price_file(text: str, source: str, kind: str) -> _LoadedFile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    try:
        parsed = PriceFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from exc
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return _LoadedFile(tuple(parsed.models), f"{kind}:{parsed.as_of}:{digest}")


class PriceTable:
    """The override file (if any) searched before the shipped table."""

    def __init__(
        self,
        files: Sequence[_LoadedFile],
        *,
        fallback_input_usd_per_mtok: str | None = None,
        fallback_output_usd_per_mtok: str | None = None,
        local_providers: Iterable[str] = DEFAULT_LOCAL_PROVIDERS,
    ) -> None:
        self._files = tuple(files)
        self.local_providers = frozenset(p.lower() for p in local_providers)
        self.version = "+".join(f.version for f in self._files)
        cloud = [e for f in self._files for e in f.entries if e.backend == "cloud"]
        fb_in = parse_rate(fallback_input_usd_per_mtok) if fallback_input_usd_per_mtok is not None else None
        fb_out = parse_rate(fallback_output_usd_per_mtok) if fallback_output_usd_per_mtok is not None else None
        if fb_in is None:
            fb_in = max((e.input_usd_per_mtok for e in cloud), default=0)
        if fb_out is None:
            fb_out = max((max(e.output_usd_per_mtok, _or(e.reasoning_usd_per_mtok, 0)) for e in cloud), default=0)
        if fb_in == 0 and fb_out == 0:
            raise ConfigError("the price table has no cloud model, so there is no fallback price; set one")
        self.fallback = Price(
            "*", "*", "cloud", fb_in, fb_in, fb_in, fb_out, fb_out, None, None, False, f"fallback:{self.version}"
        )
        self._cache: dict[tuple[str, str, str, int], Price] = {}
        # The instants at which some entry starts to apply: between two of them, lookups are alike.
        self._changes = sorted({e.valid_from.timestamp() for f in self._files for e in f.entries if e.valid_from})

    # -- construction ----------------------------------------------------------
    @classmethod
    def shipped_file(cls) -> _LoadedFile:
        text = resources.files("budgetflow.tokenizers").joinpath(_SHIPPED).read_text()
        return _read_price_file(text, f"shipped {_SHIPPED}", "shipped")

    @classmethod
    def default(cls, **kwargs: Any) -> PriceTable:
        """The shipped table alone."""
        return cls([cls.shipped_file()], **kwargs)

    @classmethod
    def from_settings(cls, pricing: PricingSettings) -> PriceTable:
        """The override file of the settings (if any) before the shipped table, with their fallback rates."""
        return cls.load(
            pricing.file,
            fallback_input_usd_per_mtok=pricing.fallback_input_usd_per_mtok,
            fallback_output_usd_per_mtok=pricing.fallback_output_usd_per_mtok,
            local_providers=pricing.local_providers,
        )

    @classmethod
    def load(cls, path: str | Path | None = None, **kwargs: Any) -> PriceTable:
        """The override file at ``path`` searched first, then the shipped table."""
        files = [cls.shipped_file()]
        if path is not None:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ConfigError(f"price file {path}: cannot be read ({exc.strerror})") from exc
            files.insert(0, _read_price_file(text, f"price file {path}", "override"))
        return cls(files, **kwargs)

    # -- lookup ----------------------------------------------------------------
    def price(
        self, model: str, *, backend: Backend = "cloud", provider: str | None = None, at: datetime | None = None
    ) -> Price:
        """The price that applies to a call whose request happened ``at`` (default: now): never free unless it
        is really local."""
        moment = time.time() if at is None else at.timestamp()
        era = bisect.bisect_right(self._changes, moment)
        key = (model, backend, provider or "", era)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        until = self._changes[era - 1] if era else float("-inf")
        result = self._resolve(model.lower(), backend, (provider or "").lower(), until)
        if len(self._cache) > 8192:
            self._cache.clear()
        self._cache[key] = result
        return result

    def _resolve(self, model: str, backend: Backend, provider: str, until: float) -> Price:
        names = [model]
        if "/" in model:
            names.append(model.rsplit("/", 1)[1])
        for loaded in self._files:
            valid = [e for e in loaded.entries if e.valid_from is None or e.valid_from.timestamp() <= until]
            for name in names:
                entry = _best(valid, name, provider)
                if entry is not None:
                    return Price.from_entry(entry, loaded.version)
        if backend == "local" and provider in self.local_providers:
            return Price(model, provider, "local", 0, 0, 0, 0, 0, None, None, True, f"local:{self.version}")
        return self.fallback

    def cost(
        self,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_input_tokens: int = 0,
        reasoning_tokens: int = 0,
        backend: Backend = "cloud",
        provider: str | None = None,
        at: datetime | None = None,
    ) -> Cost:
        """The cost formula (docs/architecture.md, "Prices") in integer pico-dollars; unpriced cloud models use the
        fallback."""
        price = self.price(model, backend=backend, provider=provider, at=at)
        pico = price.cost(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            cache_write_input_tokens=cache_write_input_tokens,
            reasoning_tokens=reasoning_tokens,
        )
        return Cost(pico, price.priced, price.backend, price.version)

    @property
    def entries(self) -> tuple[PriceEntry, ...]:
        return tuple(e for f in self._files for e in f.entries)


def _specificity(entry: PriceEntry, name: str) -> int | None:
    """How well an entry matches: exact names beat every glob; longer globs beat shorter ones."""
    best: int | None = None
    for written in (entry.match, *entry.aliases):
        pattern = written.lower()
        if pattern == name:
            return 1 << 20
        if fnmatch.fnmatchcase(name, pattern):
            best = max(best or 0, len(pattern))
    return best


def _best(entries: Sequence[PriceEntry], name: str, provider: str) -> PriceEntry | None:
    ranked: list[tuple[bool, bool, int, float, int, PriceEntry]] = []
    for index, entry in enumerate(entries):
        score = _specificity(entry, name)
        if score is not None:
            # A cloud price decides that a call is cloud (a name that is priced as
            # cloud is never made free by a label); then the event's own provider,
            # then the most specific pattern, then the latest valid_from (entries
            # already filtered to those in force), then the earliest entry.
            since = entry.valid_from.timestamp() if entry.valid_from else float("-inf")
            ranked.append((entry.backend == "cloud", entry.provider.lower() == provider, score, since, -index, entry))
    if not ranked:
        return None
    return max(ranked, key=lambda item: item[:5])[5]
