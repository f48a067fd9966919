"""The budget resolver: scopes, parents, global, unknown ids; and the policy rules that keep hierarchies sane."""

from __future__ import annotations

import pytest

from budgetflow.schemas.errors import ConfigError, InvalidEvent
from budgetflow.schemas.policy import BudgetPolicy, parse_policy_file
from budgetflow.streams.rules.scopes import BudgetResolver

POLICIES = {
    p.id: p
    for p in parse_policy_file(
        {
            "budgets": [
                {"id": "team:a", "parent": "org:eng"},
                {"id": "org:eng", "parent": "company"},
                {"id": "company"},
                {"id": "gpt4-class", "applies_to": {"model": "gpt-4*", "provider": "OpenAI"}},
                {"id": "proj:x", "applies_to": {"metadata": {"project": "x-*", "env": "prod"}}, "parent": "org:eng"},
                {"id": "local-only", "applies_to": {"backend": "local"}},
            ]
        }
    ).budgets
}


def resolve(
    listed: list[str],
    model: str = "gpt-4o",
    provider: str = "openai",
    backend: str = "cloud",
    metadata: dict[str, str] | None = None,
    unknown: str = "default",
) -> list[str]:
    resolver = BudgetResolver(lambda: POLICIES, unknown)  # type: ignore[arg-type]
    return resolver.resolve(listed, model=model, provider=provider, backend=backend, metadata=metadata or {})


def test_listed_scoped_parents_then_global_each_once() -> None:
    assert resolve(["team:a"]) == ["team:a", "gpt4-class", "org:eng", "company", "global"]
    assert resolve(["team:a", "org:eng", "global"]) == ["team:a", "org:eng", "global", "gpt4-class", "company"]


def test_scopes_match_every_condition_case_insensitively() -> None:
    assert "gpt4-class" in resolve([], model="GPT-4.1-mini", provider="openai")
    assert "gpt4-class" not in resolve([], model="gpt-4o", provider="azure")
    assert "gpt4-class" not in resolve([], model="gpt-3.5-turbo")
    assert "proj:x" in resolve([], metadata={"project": "x-42", "env": "PROD"})
    assert "proj:x" not in resolve([], metadata={"project": "x-42"})
    assert resolve([], model="llama3", provider="ollama", backend="local") == ["local-only", "global"]


def test_unknown_ids_default_ignore_or_dlq() -> None:
    seen: list[str] = []
    resolver = BudgetResolver(lambda: POLICIES, "ignore", on_unknown=seen.append)
    got = resolver.resolve(["who:me", "team:a"], model="m", provider="p", backend="cloud", metadata={})
    assert got == ["team:a", "org:eng", "company", "global"]
    assert seen == ["who:me"]
    assert resolve(["who:me"], model="m")[0] == "who:me"
    with pytest.raises(InvalidEvent, match="who:me"):
        resolve(["who:me"], unknown="dlq")


def test_a_changed_policy_is_seen_after_invalidate() -> None:
    policies = dict(POLICIES)
    resolver = BudgetResolver(lambda: policies)
    assert "new" not in resolver.resolve([], model="m", provider="p", backend="cloud", metadata={})
    policies["new"] = BudgetPolicy(id="new", applies_to={"model": "m"})  # type: ignore[arg-type]
    resolver.invalidate("new")
    assert "new" in resolver.resolve([], model="m", provider="p", backend="cloud", metadata={})


@pytest.mark.parametrize(
    ("budgets", "complaint"),
    [
        ([{"id": "a", "parent": "a"}], "own parent"),
        ([{"id": "a", "parent": "b"}, {"id": "b", "parent": "a"}], "cycle: a -> b -> a"),
        ([{"id": "global", "parent": "a"}], "global"),
        ([{"id": "a", "applies_to": {}}], "at least one"),
        ([{"id": "a", "applies_to": {"colour": "red"}}], "colour"),
        ([{"id": "a", "applies_to": {"metadata": {"Bad Key": "x"}}}], "metadata"),
    ],
)
def test_bad_hierarchies_and_scopes_are_refused(budgets: list[dict[str, object]], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_policy_file({"budgets": budgets})
