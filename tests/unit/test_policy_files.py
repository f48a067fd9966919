"""Policy files as people write them: every number form is exact, bad ones name file, line and field, TOML is
the same file, and a plan prints as an operator reads it."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.policy import BudgetPolicy, parse_policy_file, parse_policy_text
from budgetflow.streams.ops.policy_admin import load_policy_file, plan, plan_lines

EXAMPLES = Path(__file__).parents[2] / "examples"
USD = 10**12


def one(limit: str, percent: str = "75") -> BudgetPolicy:
    text = f"budgets:\n  - id: global\n    monthly_limit_usd: {limit}\n    soft_limit_percent: {percent}\n"
    (policy,) = parse_policy_text(text, source="p.yaml").budgets
    return policy


@pytest.mark.parametrize(
    ("written", "pico"),
    [
        ("100", 100 * USD),
        ("100.0", 100 * USD),
        ('"100.00"', 100 * USD),
        ("1e2", 100 * USD),
        ("1.0e+2", 100 * USD),
        ("1_000", 1000 * USD),
        ("1_000.5", 1000 * USD + USD // 2),
        ("0.1", USD // 10),  # a float would be 0.1000000000000000055...
        ("100.1", 100 * USD + USD // 10),
        ("0.000001", 10**6),
        ("0", 0),
    ],
)
def test_every_number_form_is_exact(written: str, pico: int) -> None:
    assert one(written).monthly_limit_usd == pico


@pytest.mark.parametrize("written", ["80", "80.0", "8e1"])
def test_a_whole_percent_may_be_written_with_a_point(written: str) -> None:
    assert one("1", written).soft_limit_percent == 80


BAD = """\
budgets:
  - id: global
    monthly_limit_usd: "1"
  - id: "team:a"
    description: "x"
    monthly_limit_usd: {limit}
"""


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("100.0000001", "more than 6 decimals"),
        ('"100.0000001"', "more than 6 decimals"),
        ("-1", "negative"),
        ("-0.5", "negative"),
        (".nan", "finite"),
        (".inf", "finite"),
        ("-.inf", "finite"),
    ],
)
def test_bad_numbers_name_the_line_and_the_field(written: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy_text(BAD.format(limit=written), source="policies.yaml")
    message = str(info.value)
    assert message.startswith("policies.yaml:6: budgets[1].monthly_limit_usd: "), message
    assert why in message
    assert "\n" not in message


def test_a_percent_that_is_not_whole_names_its_line() -> None:
    with pytest.raises(ConfigError, match=r"^p\.yaml:4: budgets\[0\]\.soft_limit_percent: "):
        one("1", "80.5")


def test_an_unknown_field_names_its_line() -> None:
    text = 'budgets:\n  - id: global\n  - id: "team:a"\n    monthly_limt_usd: 5\n'
    with pytest.raises(ConfigError, match=r"^p\.yaml:4: budgets\[1\]\.monthly_limt_usd: Extra inputs"):
        parse_policy_text(text, source="p.yaml")


def test_broken_yaml_names_its_line() -> None:
    with pytest.raises(ConfigError, match=r"^p\.yaml:3: not valid YAML"):
        parse_policy_text("budgets:\n  - id: a\n  x: 1\n", source="p.yaml")


def test_a_python_float_or_int_is_still_refused() -> None:
    # Only a file's text (or a Decimal, or a string) says exactly which amount was meant.
    with pytest.raises(ConfigError, match="a float is not exact"):
        parse_policy_file({"budgets": [{"id": "a", "monthly_limit_usd": 100.1}]})
    with pytest.raises(ConfigError, match="an int is ambiguous"):
        parse_policy_file({"budgets": [{"id": "a", "monthly_limit_usd": 100}]})
    (policy,) = parse_policy_file({"budgets": [{"id": "a", "monthly_limit_usd": Decimal("100.1")}]}).budgets
    assert policy.monthly_limit_usd == 100 * USD + USD // 10


def test_a_policy_read_back_from_the_topic_keeps_twelve_decimals() -> None:
    # Older versions accepted 12 decimals; a record they published must still be read.
    policy = BudgetPolicy.model_validate({"id": "a", "monthly_limit_usd": "1.000000000001"})
    assert policy.monthly_limit_usd == USD + 1


async def test_the_toml_example_is_the_yaml_example() -> None:
    from_yaml = await load_policy_file(EXAMPLES / "policies.yaml")
    from_toml = await load_policy_file(EXAMPLES / "policies.toml")
    assert from_toml == from_yaml
    assert [p.monthly_limit_usd for p in from_toml] == [100 * USD, 20 * USD, 10 * USD, 2 * USD]


TOML_BAD = """\
[[budgets]]
id = "global"

[[budgets]]
id = "team:a"
monthly_limit_usd = {limit}
"""


@pytest.mark.parametrize(
    ("written", "why"),
    [("100.0000001", "more than 6 decimals"), ("-1", "negative"), ("nan", "finite"), ("inf", "finite")],
)
def test_toml_numbers_are_exact_and_bad_ones_name_the_budget(written: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy_text(TOML_BAD.format(limit=written), source="p.toml", toml=True)
    message = str(info.value)
    assert message.startswith("p.toml: budgets[1].monthly_limit_usd: "), message
    assert why in message
    assert message.endswith(' (budget "team:a")')


def test_toml_floats_are_exact() -> None:
    text = '[[budgets]]\nid = "a"\nmonthly_limit_usd = 0.1\nsoft_limit_percent = 80.0\n'
    (policy,) = parse_policy_text(text, source="p.toml", toml=True).budgets
    assert (policy.monthly_limit_usd, policy.soft_limit_percent) == (USD // 10, 80)


def test_broken_toml_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^p\.toml: not valid TOML \(.*line 2"):
        parse_policy_text('[[budgets]]\nid = "a\n', source="p.toml", toml=True)


def policies(text: str) -> list[BudgetPolicy]:
    return parse_policy_text("budgets:\n" + text, source="p.yaml").budgets


def test_a_plan_prints_added_changed_and_removed_with_old_and_new() -> None:
    current = {
        p.id: p
        for p in policies(
            '  - {id: "team:a", monthly_limit_usd: 20, soft_limit_percent: 80}\n'
            '  - {id: "team:b", monthly_limit_usd: 5}\n'
            '  - {id: "team:old", monthly_limit_usd: 1}\n'
        )
    }
    wanted = policies(
        '  - {id: "team:a", monthly_limit_usd: 25.5, soft_limit_percent: 90, owner: "#a"}\n'
        '  - {id: "team:b", monthly_limit_usd: 5.00}\n'
        '  - {id: "team:new", monthly_limit_usd: 0.000001, applies_to: {model: "gpt-4*"}}\n'
    )
    assert plan_lines(plan(current, wanted, prune=True)) == [
        "+ team:new: monthly_limit_usd $0.000001, soft_limit_percent 75, hard_limit_action warn, "
        "applies_to {model=gpt-4*}",
        "~ team:a: monthly_limit_usd $20.00 -> $25.50, soft_limit_percent 80 -> 90, owner none -> #a",
        "- team:old",
    ]
    kept = plan(current, wanted, prune=False)
    assert (kept.removed, kept.unchanged) == ([], ["team:b"])
    assert plan_lines(kept)[-1] == "= team:old: on the topic, not in the file; kept (--prune deletes it)"
