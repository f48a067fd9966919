"""Who a LiteLLM caller is charged to (its credentials decide, never its request), and LiteLLM's usage by our rule.
Needs no LiteLLM: the integration's budget and usage rules are plain functions."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import pytest

from budgetflow.integrations.litellm.budgets import BudgetsError, charged_budgets, key_budget
from budgetflow.integrations.litellm.calls import Call, Calls, model_group, request_id_of, usage_of
from budgetflow.streams.gateway.usage import Usage


def auth(**fields: Any) -> SimpleNamespace:
    return SimpleNamespace(**{"token": None, "team_id": None, "metadata": {}, "team_metadata": None, **fields})


def test_an_sk_key_is_charged_to_its_hash_as_litellm_hands_it_over() -> None:
    hashed = hashlib.sha256(b"sk-alpha").hexdigest()  # LiteLLM's token for an sk- key
    assert charged_budgets(auth(token=hashed)) == [f"key:{hashed[:8]}"]


def test_any_other_credential_is_hashed_never_published() -> None:
    budgets = charged_budgets(auth(token="litellm_proxy_master_key"))
    assert budgets == ["key:" + hashlib.sha256(b"litellm_proxy_master_key").hexdigest()[:8]]
    assert "master" not in budgets[0]
    long = "sk_" + "z" * 61  # 64 characters, not a SHA-256: hashed like any other credential
    assert key_budget(long) == "key:" + hashlib.sha256(long.encode()).hexdigest()[:8]


def test_team_and_metadata_budgets_in_order_without_repeats() -> None:
    hashed = hashlib.sha256(b"sk-a").hexdigest()
    got = charged_budgets(
        auth(
            token=hashed,
            team_id="search",
            metadata={"budgetflow_budgets": ["project:x", "team:search"]},
            team_metadata={"budgetflow_budgets": "app:web, project:x"},
        )
    )
    assert got == [f"key:{hashed[:8]}", "team:search", "project:x", "app:web"]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"team_id": "Has Spaces"}, "team id"),
        ({"metadata": {"budgetflow_budgets": ["UPPER"]}}, "'UPPER'"),
        ({"metadata": {"budgetflow_budgets": [1, 2]}}, "list of budget ids"),
        ({"team_metadata": {"budgetflow_budgets": {"a": 1}}}, "team metadata"),
    ],
)
def test_a_setting_that_cannot_name_a_budget_is_refused_with_one_line(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(BudgetsError, match=says) as refused:
        charged_budgets(auth(token="t", **fields))
    assert "\n" not in str(refused.value)


def test_usage_streaming_and_not_with_cache_and_reasoning() -> None:
    openai_style = {
        "prompt_tokens": 100,
        "completion_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 30},
        "completion_tokens_details": {"reasoning_tokens": 12},
    }
    assert usage_of({"usage": openai_style}, {}) == Usage(100, 40, 30, 0, 12)
    anthropic_style = SimpleNamespace(
        prompt_tokens=100,
        completion_tokens=5,
        prompt_tokens_details=None,
        completion_tokens_details=None,
        cache_creation_input_tokens=20,
    )
    assert usage_of(SimpleNamespace(usage=anthropic_style), {}) == Usage(100, 5, 0, 20, 0)
    logged = {"standard_logging_object": {"prompt_tokens": 7, "completion_tokens": 3}}
    assert usage_of(None, logged) == Usage(7, 3)
    assert usage_of(None, {}) == Usage(0, 0), "a failure that reports nothing settles at 0"


def test_the_request_id_and_model_group_travel_in_the_metadata() -> None:
    before = {"metadata": {"budgetflow_request_id": "ll-1", "model_group": "gpt-4o"}}
    after = {"litellm_params": {"metadata": {"budgetflow_request_id": "ll-1", "model_group": "llama3.1"}}}
    assert (request_id_of(before), model_group(before)) == ("ll-1", "gpt-4o")
    assert (request_id_of(after), model_group(after)) == ("ll-1", "llama3.1")
    assert request_id_of({"metadata": {"budgetflow_request_id": 5}}) is None


def test_a_call_is_forgotten_once_answered_and_settled_and_after_its_ttl() -> None:
    calls = Calls(ttl_s=3600)
    call = Call("ll-1", ["key:1"], SimpleNamespace(), SimpleNamespace(), 0, {})  # type: ignore[arg-type]
    calls.add(call)
    call.attempts["gpt-4o"] = SimpleNamespace()  # type: ignore[assignment]
    call.settled.add("gpt-4o")
    calls.done(call)
    assert calls.get("ll-1") is call, "settled but not yet answered: the headers hook still needs it"
    call.answered = True
    calls.done(call)
    assert calls.get("ll-1") is None
    expiring = Calls(ttl_s=0.0)
    expiring.add(Call("ll-2", [], SimpleNamespace(), SimpleNamespace(), 0, {}))  # type: ignore[arg-type]
    expiring.add(Call("ll-3", [], SimpleNamespace(), SimpleNamespace(), 0, {}))  # type: ignore[arg-type]
    assert expiring.get("ll-2") is None
