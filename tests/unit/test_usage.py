"""Provider usage objects normalised to budgetflow's rule (input includes the cache, output the reasoning)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.streams.gateway.usage import Usage, from_anthropic, from_gemini, from_openai


def test_openai_chat_completions() -> None:
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 256},
    }
    assert from_openai(usage) == Usage(1200, 300, cached_input_tokens=1024, reasoning_tokens=256)


def test_openai_responses_api_and_sdk_objects() -> None:
    usage = SimpleNamespace(
        input_tokens=50,
        output_tokens=20,
        input_tokens_details=SimpleNamespace(cached_tokens=10),
        output_tokens_details=SimpleNamespace(reasoning_tokens=5),
    )
    assert from_openai(usage) == Usage(50, 20, cached_input_tokens=10, reasoning_tokens=5)
    assert from_openai({"prompt_tokens": 3, "completion_tokens": 1}) == Usage(3, 1)


def test_anthropic_adds_the_cache_back_into_input() -> None:
    usage = {
        "input_tokens": 20,
        "cache_creation_input_tokens": 1500,
        "cache_read_input_tokens": 3000,
        "output_tokens": 400,
    }
    assert from_anthropic(usage) == Usage(4520, 400, cached_input_tokens=3000, cache_write_input_tokens=1500)


def test_gemini_counts_thoughts_as_output() -> None:
    rest = {
        "promptTokenCount": 900,
        "cachedContentTokenCount": 600,
        "candidatesTokenCount": 100,
        "thoughtsTokenCount": 250,
        "toolUsePromptTokenCount": 40,
    }
    assert from_gemini(rest) == Usage(940, 350, cached_input_tokens=600, reasoning_tokens=250)
    sdk = SimpleNamespace(prompt_token_count=10, candidates_token_count=4, thoughts_token_count=None)
    assert from_gemini(sdk) == Usage(10, 4)


def test_non_integer_counts_are_refused() -> None:
    with pytest.raises(InvalidEvent, match="integers"):
        from_openai({"prompt_tokens": 1.5, "completion_tokens": 1})
