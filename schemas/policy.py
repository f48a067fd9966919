"""Budget policies: what operators write, validated before anything is published.

A policy file (YAML or TOML) is read with its numbers kept as the text the operator wrote: ``100``, ``100.0``,
``"100.00"`` and ``1e2`` are all exactly $100, as a :class:`~decimal.Decimal`; a float never enters.
"""

from __future__ import annotations

import re
from decimal import Decimal
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.events import BUDGET_ID_PATTERN, MAX_SHARDS, Backend, HardLimitAction, MetadataKey
from budgetflow.schemas.money import PICO_PER_USD, NonNegativeUsdAmount
from budgetflow.schemas.serde import first_error, validation_message

if TYPE_CHECKING:
    import yaml

__all__ = ["BudgetPolicy", "PolicyFile", "Scope", "parse_policy_file", "parse_policy_text"]

# A limit in a policy file has at most 6 decimals (a millionth of a dollar). Records already on the topic are read
# with the 12 that older versions accepted, so that no running budget loses its policy on an upgrade.
_FILE_PLACES = 6
_FILE = "policy_file"


def _exact_limit(value: Any) -> Any:
    # Only text and Decimal say exactly which number was meant. A float is already rounded (100.1 is not 100.1),
    # and an int is ambiguous here: model_dump() gives the limit as int pico-dollars, and reading that back as
    # dollars would raise a limit 10^12-fold.
    if isinstance(value, float):
        raise ValueError('a float is not exact: write "100.10" or pass a decimal.Decimal')
    if isinstance(value, int):
        raise ValueError('an int is ambiguous here (dollars or pico-dollars): write "100" or pass a decimal.Decimal')
    return value


def _file_places(pico: int | None, info: ValidationInfo) -> int | None:
    if pico is not None and info.context and info.context.get(_FILE) and pico % (PICO_PER_USD // 10**_FILE_PLACES):
        raise ValueError(f"amount has more than {_FILE_PLACES} decimals")
    return pico


def _whole(what: str) -> Any:
    def whole(value: Any) -> Any:
        # 80 and 80.0 as written in a file (a Decimal) are both 80; 80.5 is not whole. A Python float is refused.
        if isinstance(value, Decimal):
            if not value.is_finite() or value != value.to_integral_value():
                raise ValueError(f"must be a whole number of {what}")
            return int(value)
        return value

    return whole


LimitUsd = Annotated[NonNegativeUsdAmount, BeforeValidator(_exact_limit), AfterValidator(_file_places)]
Percent = Annotated[int, BeforeValidator(_whole("percent")), Field(gt=0, lt=100, strict=True)]
Shards = Annotated[int, BeforeValidator(_whole("shards")), Field(ge=1, le=MAX_SHARDS, strict=True)]

Glob = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class Scope(BaseModel):
    """Which requests a budget applies to without a gateway naming it: every condition given must hold.

    ``model`` and the ``metadata`` values are shell-style globs (``gpt-4*``), matched case-insensitively;
    ``provider`` and ``backend`` are exact.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    model: Glob | None = None
    backend: Backend | None = None
    metadata: Annotated[dict[MetadataKey, Glob], Field(max_length=16)] = {}

    @model_validator(mode="after")
    def _something(self) -> Scope:
        if self.provider is None and self.model is None and self.backend is None and not self.metadata:
            raise ValueError("applies_to needs at least one of provider, model, backend, metadata")
        return self


class BudgetPolicy(BaseModel):
    """One budget's monthly limit and what happens as it fills. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, StringConstraints(pattern=BUDGET_ID_PATTERN)]
    monthly_limit_usd: LimitUsd | None = Field(
        None, description="Exact decimal; absent: unlimited (tracked, always normal); 0: nothing may be spent."
    )
    soft_limit_percent: Percent = 75
    hard_limit_action: HardLimitAction = "warn"
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    owner: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9@#._:/+-]{1,128}$")] | None = Field(
        None, description="Who answers for it (a team, a person, a channel): the `owner` label of its alerts."
    )
    unpriced: Literal["estimate", "block"] = Field(
        "estimate", description="A cloud model with no price: charged at the fallback rates, or refused by routers."
    )
    applies_to: Scope | None = Field(None, description="Requests it is charged for without a gateway naming it.")
    parent: Annotated[str, StringConstraints(pattern=BUDGET_ID_PATTERN)] | None = Field(
        None, description="A budget charged for everything this one is (team -> org -> global roll-ups)."
    )
    strict: bool = Field(
        False,
        description="Routers admit cloud spend only against headroom leased from the aggregate, as for a budget "
        "whose hard limit blocks: its admitted estimates never pass its limit, whatever the number of routers.",
    )
    shards: Shards | None = Field(
        None,
        description="Ledger partitions its spend is summed on, for a budget hotter than one aggregate worker "
        "(docs/architecture.md, 'Hot budgets'); absent: 1, or SHARDS__GLOBAL for global. A sharded budget is "
        "not leased.",
    )

    @property
    def leased(self) -> bool:
        """Routers admit its cloud spend against leases: it has a limit, and it blocks at it or is strict."""
        unsharded = self.shards is None or self.shards == 1
        return unsharded and self.monthly_limit_usd is not None and (self.strict or self.hard_limit_action != "warn")

    @model_validator(mode="after")
    def _not_own_parent(self) -> BudgetPolicy:
        if self.parent == self.id:
            raise ValueError(f"parent: budget {self.id!r} cannot be its own parent")
        if self.id == "global" and (self.parent is not None or self.applies_to is not None):
            raise ValueError("global applies to every request already; it takes no parent or applies_to")
        if self.strict and (self.shards or 1) > 1:
            raise ValueError(
                f"budget {self.id!r}: strict needs leases, which a sharded budget has not (shards or strict)"
            )
        return self

    @property
    def unlimited(self) -> bool:
        return self.monthly_limit_usd is None


class PolicyFile(BaseModel):
    """The file `budgetflow policy apply` reads: a list of budgets with unique ids."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budgets: list[BudgetPolicy]

    @field_validator("budgets")
    @classmethod
    def _unique(cls, budgets: list[BudgetPolicy]) -> list[BudgetPolicy]:
        seen: set[str] = set()
        for budget in budgets:
            if budget.id in seen:
                raise ValueError(f"budget id {budget.id!r} appears twice")
            seen.add(budget.id)
        parents = {b.id: b.parent for b in budgets}
        for budget in budgets:
            chain, node = [budget.id], budget.parent
            while node is not None:
                if node in chain:
                    raise ValueError(f"parents form a cycle: {' -> '.join([*chain, node])}")
                chain.append(node)
                node = parents.get(node)
        return budgets


def parse_policy_file(data: Any, *, source: str = "policy file") -> PolicyFile:
    """Validate every entry; one line names the first problem (``budgets[2].soft_limit_percent: ...``)."""
    try:
        return PolicyFile.model_validate(data, context={_FILE: True})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from exc


def parse_policy_text(text: str, *, source: str, toml: bool = False) -> PolicyFile:
    """A policy file's text, YAML (or TOML), with its numbers exact; an error names the file, line and field.

    ``policies.yaml:7: budgets[2].monthly_limit_usd: ...``; TOML has no line per value, so its errors name the
    budget's index and id instead.
    """
    return _parse_toml(text, source) if toml else _parse_yaml(text, source)


def _parse_yaml(text: str, source: str) -> PolicyFile:
    import yaml  # not at the top: a gateway imports this module and never reads a policy file

    loader = _exact_loader()(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        line = f":{exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise ConfigError(f"{source}{line}: not valid YAML ({exc.problem or exc.context})") from exc
    except (yaml.YAMLError, ArithmeticError) as exc:
        raise ConfigError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    finally:
        loader.dispose()
    try:
        return PolicyFile.model_validate(data, context={_FILE: True})
    except ValidationError as exc:
        line = _line_of(node, first_error(exc)[0])
        raise ConfigError(f"{source}{line}: {validation_message(exc)}") from exc


def _parse_toml(text: str, source: str) -> PolicyFile:
    import tomllib  # as yaml above

    try:
        data = _ints_exact(tomllib.loads(text, parse_float=Decimal))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from exc
    try:
        return PolicyFile.model_validate(data, context={_FILE: True})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}{_budget_named(data, first_error(exc)[0])}") from exc


def _ints_exact(value: Any) -> Any:
    """TOML's ints as Decimals, like its floats: in a file, 100 is dollars (see ``_exact_limit``)."""
    if isinstance(value, dict):
        return {k: _ints_exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints_exact(v) for v in value]
    return Decimal(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _budget_named(data: Any, loc: tuple[int | str, ...]) -> str:
    """`` (budget "team:search")`` for an error inside a budget whose id is well formed; else nothing."""
    if len(loc) < 2 or loc[0] != "budgets" or not isinstance(loc[1], int):
        return ""
    budget = data["budgets"][loc[1]]
    budget_id = budget.get("id") if isinstance(budget, dict) else None
    return f' (budget "{budget_id}")' if isinstance(budget_id, str) and re.match(BUDGET_ID_PATTERN, budget_id) else ""


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> str:
    """``:7``, the line of the deepest node of the file that ``loc`` reaches; or nothing for an empty file."""
    import yaml  # as in _parse_yaml

    if node is None:
        return ""
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            found = [node.value[part]]
        else:
            found = []
        if not found:
            break
        node = found[0]
    return f":{node.start_mark.line + 1}"


@cache
def _exact_loader() -> type[yaml.SafeLoader]:
    """A SafeLoader with YAML's numbers as Decimals of the text written: never a float, so 100.1 is exactly 100.1."""
    import yaml  # as in _parse_yaml

    class ExactLoader(yaml.SafeLoader):
        pass

    ExactLoader.add_constructor("tag:yaml.org,2002:float", _exact_float)
    ExactLoader.add_constructor("tag:yaml.org,2002:int", _exact_int)
    # YAML 1.1 wants a dot in a float (1.0e+2); people write 1e2, as YAML 1.2 and TOML allow.
    ExactLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return ExactLoader


def _exact_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign, digits = ("-", text[1:]) if text[:1] == "-" else ("", text.removeprefix("+"))
    if digits.lower() == ".inf":
        return Decimal(sign + "Infinity")
    if digits.lower() == ".nan":
        return Decimal("NaN")
    if ":" in digits:  # YAML 1.1's base 60 (1:30.5 is 90.5)
        value = Decimal(0)
        for part in digits.split(":"):
            value = value * 60 + Decimal(part)
        return -value if sign else value
    return Decimal(text)


def _exact_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    # PyYAML's ints are exact already (1_000, 0x10, 1:30); only their type changes, so that 100 means dollars.
    return Decimal(loader.construct_yaml_int(node))
