"""Which tokenizer counts which model, and the counting rules for text and chat.

Rules are ordered glob patterns; the first match wins. The defaults follow
tiktoken's own model map (exact names first, then prefixes, as
``tiktoken.encoding_for_model`` does): o200k_base, o200k_harmony (counted as
o200k_base) and cl100k_base are counted exactly; ``claude-*`` is counted with
cl100k_base as an approximation; anything else by the byte heuristic.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

from tiktoken.model import MODEL_PREFIX_TO_ENCODING, MODEL_TO_ENCODING

from budgetflow.schemas.events import ChatMessage, Tier
from budgetflow.tokenizers.encodings import get_encoding

__all__ = [
    "HEURISTIC",
    "HeuristicTokenizer",
    "TiktokenTokenizer",
    "TokenCount",
    "Tokenizer",
    "TokenizerRegistry",
    "TokenizerRule",
    "heuristic_tokens",
    "utf8_len",
]

log = logging.getLogger(__name__)

EncodingName = Literal["o200k_base", "cl100k_base", "heuristic"]
# tiktoken encodings we count with a shipped vocabulary, and what we count them as.
_SUPPORTED: dict[str, EncodingName] = {
    "o200k_base": "o200k_base",
    "o200k_harmony": "o200k_base",  # same ranks and split pattern; only special tokens differ
    "cl100k_base": "cl100k_base",
}
# Per-message and per-reply overheads of the chat format (OpenAI's published rule).
_PER_MESSAGE = 3
_PER_NAME = 1
_PER_REPLY = 3
_MODEL_CACHE_MAX = 4096


class TokenCount(NamedTuple):
    """How many tokens, how trustworthy the count is, and which tokenizer made it."""

    tokens: int
    tier: Tier
    tokenizer: str


class Tokenizer(Protocol):
    """Counts the tokens of a text."""

    @property
    def name(self) -> str: ...

    @property
    def tier(self) -> Tier: ...

    def count(self, text: str) -> int: ...


def utf8_len(text: str) -> int:
    """UTF-8 length; lone surrogates (legal in JSON escapes) count as 3 bytes instead of failing."""
    return len(text.encode("utf-8", "surrogatepass"))


def heuristic_tokens(n_bytes: int) -> int:
    """ceil(b / 4 × 1.15) in integers: (23 × b + 79) // 80; 0 for 0 bytes."""
    return (23 * n_bytes + 79) // 80 if n_bytes > 0 else 0


class HeuristicTokenizer:
    """The byte-length estimate for models no shipped vocabulary covers."""

    name = "heuristic"
    tier: Tier = "heuristic"

    def count(self, text: str) -> int:
        return heuristic_tokens(utf8_len(text))


HEURISTIC = HeuristicTokenizer()


class TiktokenTokenizer:
    """A tiktoken encoding, counted with ``encode_ordinary``: special-token strings in user text are text."""

    def __init__(self, encoding: str, tier: Tier = "exact") -> None:
        self.name = encoding
        self.tier = tier
        self._encode = get_encoding(encoding).encode_ordinary

    def count(self, text: str) -> int:
        return len(self._encode(text))


@dataclass(frozen=True)
class TokenizerRule:
    """Models matching ``match`` (a glob, case-insensitive) are counted with ``encoding`` at ``tier``."""

    match: str
    encoding: EncodingName
    tier: Tier = "exact"


def _tiktoken_rules() -> list[TokenizerRule]:
    rules = []
    for name, encoding in MODEL_TO_ENCODING.items():
        supported = _SUPPORTED.get(encoding)
        rules.append(TokenizerRule(name, supported or "heuristic", "exact" if supported else "heuristic"))
    for prefix, encoding in MODEL_PREFIX_TO_ENCODING.items():
        supported = _SUPPORTED.get(encoding)
        rules.append(TokenizerRule(prefix + "*", supported or "heuristic", "exact" if supported else "heuristic"))
    return rules


DEFAULT_EXTRA_RULES = (
    # Anthropic does not publish its tokenizer; cl100k_base is a close, documented approximation.
    TokenizerRule("claude-*", "cl100k_base", "approximate"),
    TokenizerRule("anthropic.claude-*", "cl100k_base", "approximate"),
)


class TokenizerRegistry:
    """Ordered rules from model name to tokenizer; counts never raise into the stream."""

    def __init__(self, rules: Iterable[TokenizerRule]) -> None:
        self.rules = tuple(rules)
        self._tokenizers: dict[tuple[str, Tier], Tokenizer] = {}
        self._by_model: dict[str, Tokenizer] = {}

    @classmethod
    def default(cls, extra: Sequence[TokenizerRule] = ()) -> TokenizerRegistry:
        """tiktoken's model map plus ``claude-*``; ``extra`` rules (from settings) are tried first."""
        return cls([*extra, *_tiktoken_rules(), *DEFAULT_EXTRA_RULES])

    def _make(self, rule: TokenizerRule) -> Tokenizer:
        key = (rule.encoding, rule.tier)
        tokenizer = self._tokenizers.get(key)
        if tokenizer is None:
            if rule.encoding == "heuristic":
                tokenizer = HEURISTIC
            else:
                try:
                    tokenizer = TiktokenTokenizer(rule.encoding, rule.tier)
                except Exception:  # a broken vocabulary must not stop counting
                    log.exception("tokenizer %s failed to load; counting by the heuristic", rule.encoding)
                    tokenizer = HEURISTIC
            self._tokenizers[key] = tokenizer
        return tokenizer

    def tokenizer_for(self, model: str) -> Tokenizer:
        """The tokenizer of the first rule that matches ``model`` (the heuristic if none)."""
        tokenizer = self._by_model.get(model)
        if tokenizer is not None:
            return tokenizer
        tokenizer = self._lookup(model.lower())
        if tokenizer is HEURISTIC and "/" in model:
            # Routed names such as "openai/gpt-4o" or "azure/gpt-4o".
            tokenizer = self._lookup(model.rsplit("/", 1)[1].lower())
        if len(self._by_model) >= _MODEL_CACHE_MAX:
            self._by_model.clear()
        self._by_model[model] = tokenizer
        return tokenizer

    def _lookup(self, name: str) -> Tokenizer:
        for rule in self.rules:
            if name == rule.match or fnmatch.fnmatchcase(name, rule.match):
                return self._make(rule)
        return HEURISTIC

    def count_text(self, model: str, text: str) -> TokenCount:
        """Tokens of a plain text for ``model``."""
        tokenizer = self.tokenizer_for(model)
        try:
            return TokenCount(tokenizer.count(text), tokenizer.tier, tokenizer.name)
        except Exception:  # noqa: BLE001  # a tokenizer failure degrades to the heuristic, never raises
            return TokenCount(HEURISTIC.count(text), "heuristic", HEURISTIC.name)

    def count_chat(self, model: str, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> TokenCount:
        """Σ (3 + role + content + [name + 1]) + 3 over messages.

        List content counts the concatenation of its text parts; non-text parts
        and tool calls (whose function names and arguments are counted as text)
        make the tier ``approximate``.
        """
        tokenizer = self.tokenizer_for(model)
        try:
            tokens, approximate = _count_chat(tokenizer, messages)
        except Exception:  # noqa: BLE001
            tokens, approximate = _count_chat(HEURISTIC, messages)
            return TokenCount(tokens, "heuristic", HEURISTIC.name)
        tier = tokenizer.tier
        if approximate and tier == "exact":
            tier = "approximate"
        return TokenCount(tokens, tier, tokenizer.name)


def _field(message: ChatMessage | Mapping[str, Any], name: str) -> Any:
    if isinstance(message, ChatMessage):
        return getattr(message, name)
    return message.get(name)


def content_text(content: Any) -> tuple[str, bool]:
    """The text of a message's content, and whether anything non-text was left out."""
    if content is None:
        return "", False
    if isinstance(content, str):
        return content, False
    if isinstance(content, list):
        texts: list[str] = []
        other = False
        for part in content:
            if (
                isinstance(part, Mapping)
                and part.get("type") in ("text", "input_text")
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
            else:
                other = True
        return "".join(texts), other
    return "", True


def tool_call_text(tool_calls: Any) -> str:
    """Function names and argument strings of tool calls, as the text they roughly cost."""
    pieces: list[str] = []
    for call in tool_calls or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            for key in ("name", "arguments"):
                value = function.get(key)
                if isinstance(value, str):
                    pieces.append(value)
    return "".join(pieces)


def _count_chat(tokenizer: Tokenizer, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> tuple[int, bool]:
    count = tokenizer.count
    total = _PER_REPLY
    approximate = False
    for message in messages:
        text, other = content_text(_field(message, "content"))
        total += _PER_MESSAGE + count(str(_field(message, "role") or "")) + count(text)
        name = _field(message, "name")
        if name:
            total += count(name) + _PER_NAME
        tool_calls = _field(message, "tool_calls")
        if tool_calls:
            total += count(tool_call_text(tool_calls))
            approximate = True
        approximate = approximate or other
    return total, approximate
