"""Budget policies: what operators write, validated before anything is published."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.events import BUDGET_ID_PATTERN, HardLimitAction
from budgetflow.schemas.money import NonNegativeUsdAmount
from budgetflow.schemas.serde import validation_message

__all__ = ["BudgetPolicy", "PolicyFile", "parse_policy_file"]


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
        return budgets


def parse_policy_file(data: Any, *, source: str = "policy file") -> PolicyFile:
    """Validate every entry; one line names the first problem (``budgets[2].soft_limit_percent: ...``)."""
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from exc
