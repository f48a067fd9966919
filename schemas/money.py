"""Exact money: integer pico-dollars (1e-12 USD) everywhere, decimal strings on the wire.

A float never enters the money path: parsing refuses it, and the only way out
to a float is :func:`pico_to_float_usd`, for Prometheus.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = [
    "MAX_ENTRY_PICO",
    "MAX_PERIOD_PICO",
    "PICO_PER_USD",
    "NonNegativeUsdAmount",
    "PicoUsd",
    "UsdAmount",
    "UsdRate",
    "format_usd",
    "parse_rate",
    "parse_usd",
    "pico_to_float_usd",
    "usd_string",
]

PICO_PER_USD = 10**12
# Rates are USD per million tokens with at most 6 decimals, so that a
# per-token rate is a whole number of pico-dollars.
_PICO_PER_TOKEN_PER_USD_PER_MTOK = 10**6
# What a person may write (a limit, an adjustment): a quadrillion dollars is 10^27 pico-dollars, which is
# past int64 (9.2 * 10^18) and past what orjson encodes (64 bits). Written amounts are parsed exactly here and
# bounded where they enter the data path, by the two limits below.
_MAX_USD = Decimal(10) ** 15

MAX_ENTRY_PICO = 10**18
"""The one bound of a single ledger entry's amount, either sign: $1,000,000 (10^18 pico-dollars, inside int64).

Enrich refuses a request or usage whose estimate or cost passes it (dead letter ``out_of_range``; a reservation is
capped at it instead, since it is an estimate), ``budgetflow ledger adjust`` refuses a larger adjustment, and the
aggregate dead-letters an entry past it.
"""

MAX_PERIOD_PICO = 10**24
"""The bound of one budget's month: ``|settled| + reserved`` never passes $10^12 (10^24 pico-dollars).

An entry that would take a period past it goes to the dead-letter topic as ``out_of_range`` and changes nothing.
Sums this large pass 64 bits, so the ledger's state encodes them as decimal strings when they do.
"""


def _decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, (bool, float)):
        raise ValueError(f'{what} must be a decimal string such as "12.50", not a float')
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if not text or text.lower().lstrip("+-") in ("nan", "inf", "infinity", "snan") or "e" in text.lower():
            raise ValueError(f'{what} must be a plain decimal string such as "12.50"')
        try:
            number = Decimal(text)
        except InvalidOperation as exc:
            raise ValueError(f'{what} must be a decimal string such as "12.50"') from exc
    else:
        raise ValueError(f'{what} must be a decimal string such as "12.50"')
    if not number.is_finite():
        raise ValueError(f"{what} must be finite")
    return number


def parse_usd(value: Any, *, what: str = "amount") -> int:
    """A USD amount (decimal string or int) as exact integer pico-dollars.

    More than 12 decimals cannot be represented exactly and is refused, as is a float.
    """
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < _MAX_USD:
        return value * PICO_PER_USD
    number = _decimal(value, what)
    if abs(number) >= _MAX_USD:
        raise ValueError(f"{what} is out of range")
    pico = number * PICO_PER_USD
    if pico != pico.to_integral_value():
        raise ValueError(f"{what} has more than 12 decimals")
    return int(pico)


def parse_rate(value: Any, *, what: str = "rate") -> int:
    """A price in USD per million tokens (at most 6 decimals) as pico-dollars per token."""
    number = _decimal(value, what)
    if number < 0:
        raise ValueError(f"{what} must not be negative")
    if number >= Decimal(10) ** 9:
        raise ValueError(f"{what} is out of range")
    scaled = number * _PICO_PER_TOKEN_PER_USD_PER_MTOK
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{what} has more than 6 decimals (USD per million tokens)")
    return int(scaled)


def format_usd(pico: int, places: int = 12) -> str:
    """Pico-dollars as a decimal USD string; 12 places is exact, fewer rounds half up."""
    if not isinstance(pico, int) or isinstance(pico, bool):
        raise TypeError("pico-dollars must be an int")
    if places >= 12:
        sign = "-" if pico < 0 else ""
        whole, frac = divmod(abs(pico), PICO_PER_USD)
        return f"{sign}{whole}.{frac:012d}"
    step = 10 ** (12 - places)
    sign = "-" if pico < 0 else ""
    rounded = (abs(pico) + step // 2) // step
    whole, frac = divmod(rounded, 10**places)
    return f"{sign}{whole}.{frac:0{places}d}" if places else f"{sign}{whole}"


def usd_string(pico: int) -> str:
    """The wire form: exact, 12 decimals."""
    return format_usd(pico, 12)


def pico_to_float_usd(pico: int) -> float:
    """For Prometheus only: the one place money becomes a float."""
    return pico / PICO_PER_USD


def _parse_pico(value: Any) -> int:
    # Inside Python an int is already pico-dollars; on the wire it is a string.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return parse_usd(value)


def _parse_written(value: Any) -> int:
    # An amount a person or another program wrote: only a decimal string is
    # unambiguous (100 could mean dollars or pico-dollars), so ints are refused too.
    if isinstance(value, (int, float)):
        raise ValueError('write USD amounts as quoted decimal strings, e.g. "100.00"')
    return parse_usd(value)


def _parse_written_non_negative(value: Any) -> int:
    pico = _parse_written(value)
    if pico < 0:
        raise ValueError("amount must not be negative")
    return pico


_USD_SCHEMA = WithJsonSchema(
    {"type": "string", "pattern": r"^-?\d+(\.\d{1,12})?$", "description": "USD as an exact decimal string"}
)
_SERIALIZE = PlainSerializer(usd_string, return_type=str, when_used="json")

PicoUsd = Annotated[int, BeforeValidator(_parse_pico), _SERIALIZE, _USD_SCHEMA]
"""USD held as int pico-dollars: an int is taken as pico-dollars, a string as decimal USD.

For values budgetflow computes itself (statuses, ledger amounts). JSON always carries the string.
"""

UsdAmount = Annotated[int, BeforeValidator(_parse_written), _SERIALIZE, _USD_SCHEMA]
"""A signed USD amount someone wrote (a policy, an adjustment): decimal strings only, held as pico-dollars."""

NonNegativeUsdAmount = Annotated[int, BeforeValidator(_parse_written_non_negative), _SERIALIZE, _USD_SCHEMA]
"""Like :data:`UsdAmount`, at least zero."""

UsdRate = Annotated[
    int,
    BeforeValidator(parse_rate),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d{1,6})?$", "description": "USD per million tokens"}),
]
"""A price in USD per million tokens (at most 6 decimals), held as int pico-dollars per token."""
