"""Policies refuse anything unclear, with one line naming the entry and field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.policy import parse_policy_file

GOOD = """
budgets:
  - id: global
    monthly_limit_usd: "100.00"
    soft_limit_percent: 75
    hard_limit_action: block_cloud
    description: "company-wide"
  - id: "team:search"
    monthly_limit_usd: "20"
  - id: "key:3fa9c2"
"""


def test_a_good_file_parses() -> None:
    policies = parse_policy_file(yaml.safe_load(GOOD)).budgets
    assert [p.id for p in policies] == ["global", "team:search", "key:3fa9c2"]
    assert policies[0].monthly_limit_usd == 100 * 10**12
    assert policies[1].hard_limit_action == "warn"
    assert policies[1].soft_limit_percent == 75
    assert policies[2].unlimited


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"id": "global", "monthly_limit_usd": 100.5}, "budgets[0].monthly_limit_usd: "),
        ({"id": "global", "monthly_limit_usd": 100}, "an int is ambiguous"),
        ({"id": "global", "monthly_limit_usd": "-1"}, "negative"),
        ({"id": "global", "soft_limit_percent": 100}, "budgets[0].soft_limit_percent"),
        ({"id": "global", "soft_limit_percent": 0}, "budgets[0].soft_limit_percent"),
        ({"id": "global", "soft_limit_percent": 75.5}, "budgets[0].soft_limit_percent"),
        ({"id": "global", "hard_limit_action": "explode"}, "budgets[0].hard_limit_action"),
        ({"id": "Global"}, "budgets[0].id"),
        ({"id": "global", "monthly_limt_usd": "1"}, "budgets[0].monthly_limt_usd: Extra inputs"),
    ],
)
def test_bad_entries_are_refused_with_the_field(entry: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy_file({"budgets": [entry]}, source="p.yaml")
    message = str(info.value)
    assert message.startswith("p.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ConfigError, match="appears twice"):
        parse_policy_file({"budgets": [{"id": "a"}, {"id": "a"}]})


def test_a_zero_limit_means_nothing_may_be_spent() -> None:
    (policy,) = parse_policy_file({"budgets": [{"id": "frozen", "monthly_limit_usd": "0"}]}).budgets
    assert policy.monthly_limit_usd == 0
    assert not policy.unlimited
