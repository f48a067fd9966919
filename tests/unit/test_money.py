"""Money is exact: integer pico-dollars inside, decimal strings outside, floats refused."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from budgetflow.schemas.money import (
    PICO_PER_USD,
    NonNegativeUsdAmount,
    PicoUsd,
    UsdAmount,
    format_usd,
    parse_rate,
    parse_usd,
    pico_to_float_usd,
    usd_string,
)
from budgetflow.schemas.serde import dumps, loads


class Wire(BaseModel):
    amount: PicoUsd


class Written(BaseModel):
    amount: UsdAmount
    limit: NonNegativeUsdAmount | None = None


@pytest.mark.parametrize(
    ("text", "pico"),
    [
        ("0", 0),
        ("12.50", 12_500_000_000_000),
        ("12.345678901234", 12_345_678_901_234),
        ("-0.000000000001", -1),
        ("  7 ", 7 * PICO_PER_USD),
    ],
)
def test_parse_usd_is_exact(text: str, pico: int) -> None:
    assert parse_usd(text) == pico


@pytest.mark.parametrize("bad", [0.1, 1.0, float("nan"), float("inf"), "nan", "Infinity", "1e3", "", "abc", None, [1]])
def test_parse_usd_refuses_floats_and_non_decimals(bad: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  # each case has its own message
        parse_usd(bad)


def test_more_than_12_decimals_is_refused() -> None:
    with pytest.raises(ValueError, match="12 decimals"):
        parse_usd("0.0000000000001")


@given(st.integers(min_value=-(10**26), max_value=10**26))
def test_wire_string_round_trips_exactly(pico: int) -> None:
    assert parse_usd(usd_string(pico)) == pico
    assert Decimal(usd_string(pico)) * PICO_PER_USD == pico


def test_format_rounds_half_up_for_display() -> None:
    assert format_usd(1_234_565_000_000, 2) == "1.23"
    assert format_usd(1_235_000_000_000, 2) == "1.24"
    assert format_usd(-1_235_000_000_000, 2) == "-1.24"
    assert format_usd(999_999_999_999, 6) == "1.000000"
    with pytest.raises(TypeError):
        format_usd(1.5)  # type: ignore[arg-type]


def test_rates_have_at_most_6_decimals() -> None:
    assert parse_rate("2.50") == 2_500_000  # pico-dollars per token
    assert parse_rate("0.000001") == 1
    with pytest.raises(ValueError, match="6 decimals"):
        parse_rate("0.0000001")
    with pytest.raises(ValueError, match="float"):
        parse_rate(2.5)
    with pytest.raises(ValueError, match="negative"):
        parse_rate("-1")


def test_pico_usd_field_takes_ints_as_pico_and_writes_strings() -> None:
    assert Wire(amount=5).amount == 5
    assert Wire.model_validate({"amount": "0.000000000005"}).amount == 5
    assert loads(dumps(Wire(amount=12_500_000_000_000))) == {"amount": "12.500000000000"}
    with pytest.raises(ValidationError, match="float"):
        Wire(amount=0.5)  # type: ignore[arg-type]


def test_written_amounts_must_be_strings() -> None:
    assert Written(amount="-3.25").amount == -3_250_000_000_000  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="quoted decimal strings"):
        Written(amount=100)
    with pytest.raises(ValidationError, match="quoted decimal strings"):
        Written(amount=99.99)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="negative"):
        Written(amount="1", limit="-1")  # type: ignore[arg-type]


def test_floats_only_at_the_prometheus_edge() -> None:
    assert pico_to_float_usd(1_500_000_000_000) == 1.5
