"""Provider usage objects normalised to budgetflow's one rule.

``input_tokens`` counts every prompt token (cache reads and writes included),
``output_tokens`` every generated token (reasoning included); the cache and
reasoning counts are subsets. Each function takes the provider's usage as a
dict (JSON) or as an SDK object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from budgetflow.schemas.errors import InvalidEvent

__all__ = ["Usage", "from_anthropic", "from_gemini", "from_openai"]


@dataclass(frozen=True)
class Usage:
    """Token counts by budgetflow's rule."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    reasoning_tokens: int = 0


def _get(obj: Any, *names: str) -> Any:
    """The first present field among ``names`` (dict keys or attributes); None if none."""
    for name in names:
        if obj is None:
            return None
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _int(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEvent("invalid", f"token counts must be integers, got {type(value).__name__}")
    return value


def from_openai(usage: Any) -> Usage:
    """OpenAI Chat Completions (`prompt_tokens`...) or Responses (`input_tokens`...) usage."""
    details_in = _get(usage, "prompt_tokens_details", "input_tokens_details")
    details_out = _get(usage, "completion_tokens_details", "output_tokens_details")
    return Usage(
        input_tokens=_int(_get(usage, "prompt_tokens", "input_tokens")),
        output_tokens=_int(_get(usage, "completion_tokens", "output_tokens")),
        cached_input_tokens=_int(_get(details_in, "cached_tokens")),
        reasoning_tokens=_int(_get(details_out, "reasoning_tokens")),
    )


def from_anthropic(usage: Any) -> Usage:
    """Anthropic Messages usage: its `input_tokens` leaves the cache out, so the cache is added back."""
    reads = _int(_get(usage, "cache_read_input_tokens"))
    writes = _int(_get(usage, "cache_creation_input_tokens"))
    return Usage(
        input_tokens=_int(_get(usage, "input_tokens")) + reads + writes,
        output_tokens=_int(_get(usage, "output_tokens")),
        cached_input_tokens=reads,
        cache_write_input_tokens=writes,
    )


def from_gemini(usage_metadata: Any) -> Usage:
    """Gemini `usageMetadata` (REST, camelCase) or `usage_metadata` (Python SDK, snake_case).

    Gemini counts thinking apart from the candidates, so output = candidates + thoughts.
    """
    thoughts = _int(_get(usage_metadata, "thoughtsTokenCount", "thoughts_token_count"))
    return Usage(
        input_tokens=_int(_get(usage_metadata, "promptTokenCount", "prompt_token_count"))
        + _int(_get(usage_metadata, "toolUsePromptTokenCount", "tool_use_prompt_token_count")),
        output_tokens=_int(_get(usage_metadata, "candidatesTokenCount", "candidates_token_count")) + thoughts,
        cached_input_tokens=_int(_get(usage_metadata, "cachedContentTokenCount", "cached_content_token_count")),
        reasoning_tokens=thoughts,
    )
