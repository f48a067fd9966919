"""Budget policies: what operators write, validated before anything is published."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.events import BUDGET_ID_PATTERN, Backend, HardLimitAction, MetadataKey
from budgetflow.schemas.money import NonNegativeUsdAmount
from budgetflow.schemas.serde import validation_message

__all__ = ["BudgetPolicy", "PolicyFile", "Scope", "parse_policy_file"]

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
    monthly_limit_usd: NonNegativeUsdAmount | None = Field(
        None, description="Decimal string; absent: unlimited (tracked, always normal); 0: nothing may be spent."
    )
    soft_limit_percent: Annotated[int, Field(gt=0, lt=100, strict=True)] = 75
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

    @model_validator(mode="after")
    def _not_own_parent(self) -> BudgetPolicy:
        if self.parent == self.id:
            raise ValueError(f"parent: budget {self.id!r} cannot be its own parent")
        if self.id == "global" and (self.parent is not None or self.applies_to is not None):
            raise ValueError("global applies to every request already; it takes no parent or applies_to")
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
        return PolicyFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from exc
