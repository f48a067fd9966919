"""Prices: exact integer costs, lookup precedence, never free by accident, files validated."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from budgetflow.schemas.errors import ConfigError, InvalidEvent
from budgetflow.tokenizers.pricing import PriceTable

TABLE = PriceTable.default()

OVERRIDE = """
as_of: "2026-11-15"
models:
  - match: "gpt-4o"
    provider: openai
    input_usd_per_mtok: "2.000001"
    output_usd_per_mtok: "8.00"
    source: "negotiated"
  - match: "acme-*"
    provider: acme
    input_usd_per_mtok: "1"
    output_usd_per_mtok: "2"
  - match: "acme-large-*"
    provider: acme
    input_usd_per_mtok: "10"
    output_usd_per_mtok: "20"
  - match: "acme-large-v2"
    provider: acme
    input_usd_per_mtok: "100"
    output_usd_per_mtok: "200"
  - match: "house-*"
    provider: vllm
    backend: local
    input_usd_per_mtok: "0"
    output_usd_per_mtok: "0"
  - match: "house-cloud-*"
    provider: acme
    input_usd_per_mtok: "3"
    output_usd_per_mtok: "4"
"""


@pytest.fixture
def override(tmp_path: Path) -> PriceTable:
    path = tmp_path / "prices.yaml"
    path.write_text(OVERRIDE)
    return PriceTable.load(path)


def test_gpt_4o_cost_by_the_formula() -> None:
    # (1000 - 200 - 0) × 2.50/M + 200 × 1.25/M + (500 - 0) × 10/M
    cost = TABLE.cost("gpt-4o", input_tokens=1000, cached_input_tokens=200, output_tokens=500, provider="openai")
    assert cost.pico_usd == 800 * 2_500_000 + 200 * 1_250_000 + 500 * 10_000_000
    assert cost.priced
    assert cost.backend == "cloud"
    assert cost.price_version.startswith("shipped:")


def test_anthropic_cache_writes_and_reads_have_their_own_rates() -> None:
    price = TABLE.price("claude-sonnet-4-5-20250929", provider="anthropic")
    assert (price.input, price.cached_input, price.cache_write_input, price.output) == (
        3_000_000,
        300_000,
        3_750_000,
        15_000_000,
    )
    cost = TABLE.cost(
        "claude-sonnet-4-5",
        input_tokens=1000,
        cached_input_tokens=600,
        cache_write_input_tokens=300,
        output_tokens=100,
        reasoning_tokens=40,
    )
    assert cost.pico_usd == 100 * 3_000_000 + 600 * 300_000 + 300 * 3_750_000 + 60 * 15_000_000 + 40 * 15_000_000


usage = st.tuples(*(st.integers(0, 10**7) for _ in range(5)))


@given(a=usage, b=usage, model=st.sampled_from(["gpt-4o", "claude-haiku-4-5", "o3", "unknown-model", "llama3.1"]))
def test_cost_is_exactly_additive_over_splits(a: tuple[int, ...], b: tuple[int, ...], model: str) -> None:
    def cost(plain_in: int, cached: int, write: int, plain_out: int, reasoning: int) -> int:
        return TABLE.cost(
            model,
            input_tokens=plain_in + cached + write,
            cached_input_tokens=cached,
            cache_write_input_tokens=write,
            output_tokens=plain_out + reasoning,
            reasoning_tokens=reasoning,
            backend="local" if model == "llama3.1" else "cloud",
            provider="ollama",
        ).pico_usd

    total = tuple(x + y for x, y in zip(a, b, strict=True))
    assert cost(*total) == cost(*a) + cost(*b)
    assert isinstance(cost(*total), int)


def test_usage_that_breaks_the_rule_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="rule"):
        TABLE.cost("gpt-4o", input_tokens=10, cached_input_tokens=11, output_tokens=0)


def test_override_is_searched_first(override: PriceTable) -> None:
    assert override.price("gpt-4o", provider="openai").input == 2_000_001
    assert override.price("gpt-4o", provider="openai").version.startswith("override:2026-11-15:")
    assert override.price("gpt-4o-mini", provider="openai").version.startswith("shipped:")


def test_exact_beats_glob_and_the_longest_glob_wins(override: PriceTable) -> None:
    assert override.price("acme-small", provider="acme").input == 1_000_000
    assert override.price("acme-large-v1", provider="acme").input == 10_000_000
    assert override.price("acme-large-v2", provider="acme").input == 100_000_000


def test_a_priced_cloud_model_is_never_made_free_by_a_local_label() -> None:
    cost = TABLE.cost("gpt-4o", input_tokens=1000, output_tokens=0, backend="local", provider="ollama")
    assert cost.backend == "cloud"
    assert cost.pico_usd == 1000 * 2_500_000


def test_a_cloud_entry_beats_a_local_glob(override: PriceTable) -> None:
    assert override.price("house-cloud-7b", backend="local", provider="vllm").backend == "cloud"
    assert override.price("house-7b", backend="local", provider="vllm").backend == "local"


def test_local_models_cost_nothing() -> None:
    cost = TABLE.cost("llama3.1:70b", input_tokens=10**6, output_tokens=10**6, backend="local", provider="ollama")
    assert (cost.pico_usd, cost.priced, cost.backend) == (0, True, "local")
    unlisted = TABLE.cost("my-finetune", input_tokens=1000, output_tokens=1000, backend="local", provider="vllm")
    assert (unlisted.pico_usd, unlisted.priced, unlisted.backend) == (0, True, "local")


def test_an_unpriced_model_is_never_free() -> None:
    cost = TABLE.cost("mystery-model", input_tokens=1000, output_tokens=1000, provider="openai")
    assert not cost.priced
    highest_in = max(e.input_usd_per_mtok for e in TABLE.entries if e.backend == "cloud")
    highest_out = max(e.output_usd_per_mtok for e in TABLE.entries if e.backend == "cloud")
    assert cost.pico_usd == 1000 * highest_in + 1000 * highest_out > 0
    # A local label from a provider that is not a local runtime does not make it free either.
    assert not TABLE.cost("mystery-model", input_tokens=1, output_tokens=0, backend="local", provider="openai").priced


def test_fallback_rates_are_configurable() -> None:
    table = PriceTable.default(fallback_input_usd_per_mtok="1", fallback_output_usd_per_mtok="2")
    assert table.cost("mystery", input_tokens=10, output_tokens=10).pico_usd == 10 * 1_000_000 + 10 * 2_000_000


@pytest.mark.parametrize(
    ("entry_patch", "expected"),
    [
        ({"input_usd_per_mtok": "2.1234567"}, "models[0].input_usd_per_mtok: rate has more than 6 decimals"),
        ({"input_usd_per_mtok": 2.5}, "not a float"),
        ({"output_usd_per_mtok": "-1"}, "negative"),
        ({"backend": "edge"}, "models[0].backend"),
        ({"colour": "red"}, "models[0].colour"),
    ],
)
def test_bad_price_files_fail_with_one_line(tmp_path: Path, entry_patch: dict[str, object], expected: str) -> None:
    entry = {"match": "m", "provider": "p", "input_usd_per_mtok": "1", "output_usd_per_mtok": "1", **entry_patch}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"as_of": "2026-11-01", "models": [entry]}))
    with pytest.raises(ConfigError) as info:
        PriceTable.load(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_override_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        PriceTable.load(tmp_path / "nope.yaml")


def test_every_shipped_price_says_where_it_came_from() -> None:
    for entry in TABLE.entries:
        assert entry.source, entry.match
        if entry.backend == "cloud":
            assert entry.max_output_tokens, entry.match
            assert entry.input_usd_per_mtok > 0


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o", "openai"),
        ("gpt-4o-mini", "openai"),
        ("gpt-4.1", "openai"),
        ("o3", "openai"),
        ("gpt-5", "openai"),
        ("claude-opus-4-5", "anthropic"),
        ("claude-sonnet-4-5", "anthropic"),
        ("claude-haiku-4-5", "anthropic"),
        ("claude-3-5-haiku-20241022", "anthropic"),
    ],
)
def test_major_models_are_priced(model: str, provider: str) -> None:
    assert TABLE.price(model, provider=provider).priced


def test_dated_snapshots_do_not_take_a_siblings_price() -> None:
    assert TABLE.price("gpt-4o-mini-2024-07-18").input == TABLE.price("gpt-4o-mini").input
    assert TABLE.price("gpt-4o-2024-05-13").input != TABLE.price("gpt-4o-mini").input
