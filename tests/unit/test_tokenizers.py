"""Token counts agree with tiktoken itself; the registry agrees with tiktoken's model map."""

from __future__ import annotations

import random
import subprocess
import sys
from typing import Any

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.model import MODEL_PREFIX_TO_ENCODING, MODEL_TO_ENCODING, encoding_name_for_model

from budgetflow.tokenizers import encodings
from budgetflow.tokenizers.registry import (
    HEURISTIC,
    TokenizerRegistry,
    TokenizerRule,
    heuristic_tokens,
)

REGISTRY = TokenizerRegistry.default()
SUPPORTED = {"o200k_base": "o200k_base", "o200k_harmony": "o200k_base", "cl100k_base": "cl100k_base"}
# One model per encoding and tier that the registry must count exactly like tiktoken.
MODELS = [
    ("gpt-4o", "o200k_base", "exact"),
    ("gpt-4", "cl100k_base", "exact"),
    ("gpt-oss-120b", "o200k_base", "exact"),
    ("claude-sonnet-4-5", "cl100k_base", "approximate"),
]

SPECIALS = ["<|endoftext|>", "<|endofprompt|>", "<|fim_prefix|>", "<|im_start|>", "<|start|>", "<|return|>"]
EMOJI = ["👩‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽", "🇯🇵", "❤️", "🧑‍💻", "e\u0301", "\u200b", "\ufeff", "ﷺ", "𝔘𝔫𝔦"]
CODE = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {}",
    "SELECT * FROM t WHERE a='b';",
    '{"k": [1, 2.5e-3]}',
]


def texts() -> st.SearchStrategy[str]:
    atoms = st.one_of(
        st.text(max_size=40),
        st.sampled_from(SPECIALS),
        st.sampled_from(EMOJI),
        st.sampled_from(CODE),
        st.text(alphabet=" \t\n\r", min_size=1, max_size=30),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
        st.from_regex(r"[0-9]{1,30}", fullmatch=True),
    )
    return st.lists(atoms, max_size=12).map("".join)


@pytest.mark.parametrize(("model", "encoding", "tier"), MODELS)
@settings(max_examples=1500)
@given(text=texts())
def test_count_text_equals_tiktoken(
    reference_tiktoken: dict[str, tiktoken.Encoding], model: str, encoding: str, tier: str, text: str
) -> None:
    count = REGISTRY.count_text(model, text)
    assert count.tokens == len(reference_tiktoken[encoding].encode_ordinary(text))
    assert count.tier == tier
    assert count.tokenizer == encoding


def test_count_text_on_long_and_seeded_corpus(reference_tiktoken: dict[str, tiktoken.Encoding]) -> None:
    rng = random.Random(20261129)
    pool = [
        *SPECIALS,
        *EMOJI,
        *CODE,
        "hello",
        " world",
        "\n\n",
        "   ",
        "Ünïcödé",
        "日本語のテキスト",
        "مرحبا",
        "x" * 50,
    ]
    corpus = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 400))) for _ in range(1000)]
    corpus.append("a" * 200_000)
    corpus.append(" ".join(str(i) for i in range(30_000)))
    for model, encoding, _ in MODELS:
        reference = reference_tiktoken[encoding]
        for text in corpus:
            assert REGISTRY.count_text(model, text).tokens == len(reference.encode_ordinary(text))


def test_special_token_strings_in_user_text_are_text(reference_tiktoken: dict[str, tiktoken.Encoding]) -> None:
    text = "please print <|endoftext|> literally"
    ours = REGISTRY.count_text("gpt-4o", text).tokens
    assert ours == len(reference_tiktoken["o200k_base"].encode(text, disallowed_special=()))
    assert ours > len(reference_tiktoken["o200k_base"].encode(text, allowed_special="all"))


def test_shipped_encodings_match_tiktoken_definitions(reference_tiktoken: dict[str, tiktoken.Encoding]) -> None:
    for name in ("o200k_base", "cl100k_base"):
        ours, theirs = encodings.get_encoding(name), reference_tiktoken[name]
        assert ours._pat_str == theirs._pat_str
        assert ours._special_tokens == theirs._special_tokens
        assert ours._mergeable_ranks == theirs._mergeable_ranks


@pytest.mark.parametrize("name", sorted(MODEL_TO_ENCODING))
def test_registry_agrees_with_tiktoken_for_every_mapped_name(name: str) -> None:
    expected = SUPPORTED.get(encoding_name_for_model(name), "heuristic")
    tokenizer = REGISTRY.tokenizer_for(name)
    assert tokenizer.name == expected
    assert tokenizer.tier == ("exact" if expected != "heuristic" else "heuristic")


@pytest.mark.parametrize("prefix", sorted(MODEL_PREFIX_TO_ENCODING))
def test_registry_agrees_with_tiktoken_for_every_prefix(prefix: str) -> None:
    for suffix in ("2099-01-01", "x", "mini-2031"):
        name = prefix + suffix
        expected = SUPPORTED.get(encoding_name_for_model(name), "heuristic")
        assert REGISTRY.tokenizer_for(name).name == expected, name


def test_claude_is_approximate_and_unknown_models_are_heuristic() -> None:
    assert REGISTRY.count_text("claude-opus-4-5", "hello").tier == "approximate"
    assert REGISTRY.count_text("Claude-Haiku-4-5", "hello").tokenizer == "cl100k_base"
    count = REGISTRY.count_text("llama3.1:8b", "hello world")
    assert (count.tier, count.tokenizer, count.tokens) == ("heuristic", "heuristic", heuristic_tokens(11))


def test_routed_model_names_find_their_tokenizer() -> None:
    assert REGISTRY.tokenizer_for("openai/gpt-4o").name == "o200k_base"
    assert REGISTRY.tokenizer_for("azure/gpt-4").name == "cl100k_base"


def test_extra_rules_come_first() -> None:
    registry = TokenizerRegistry.default(
        [TokenizerRule("gpt-4o*", "cl100k_base", "approximate"), TokenizerRule("my-model", "o200k_base")]
    )
    assert registry.tokenizer_for("gpt-4o-mini").name == "cl100k_base"
    assert registry.tokenizer_for("my-model").name == "o200k_base"
    assert registry.tokenizer_for("gpt-4").name == "cl100k_base"


@pytest.mark.parametrize(("n_bytes", "tokens"), [(0, 0), (1, 1), (3, 1), (4, 2), (80, 23), (81, 24), (1000, 288)])
def test_heuristic_formula(n_bytes: int, tokens: int) -> None:
    assert heuristic_tokens(n_bytes) == tokens


@given(st.integers(1, 10**12))
def test_heuristic_is_the_ceiling_of_b_over_4_times_1_15(n_bytes: int) -> None:
    # ceil(b / 4 × 1.15) = ceil(23 b / 80), in exact integers
    assert heuristic_tokens(n_bytes) == -(-23 * n_bytes // 80)


def test_heuristic_counts_utf8_bytes_and_survives_lone_surrogates() -> None:
    assert HEURISTIC.count("é") == heuristic_tokens(2)
    assert HEURISTIC.count("\ud800") == heuristic_tokens(3)
    assert REGISTRY.count_text("gpt-4o", "\ud800abc").tokens > 0


def _chat_reference(encoding: tiktoken.Encoding, messages: list[dict[str, Any]]) -> int:
    total = 3
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(p["text"] for p in content if p.get("type") in ("text", "input_text"))
        total += 3 + len(encoding.encode_ordinary(m["role"])) + len(encoding.encode_ordinary(content))
        if m.get("name"):
            total += len(encoding.encode_ordinary(m["name"])) + 1
        for call in m.get("tool_calls") or ():
            total += len(encoding.encode_ordinary(call["function"]["name"] + call["function"]["arguments"]))
    return total


roles = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
text_part = st.builds(lambda t: {"type": "text", "text": t}, texts())
messages_strategy = st.lists(
    st.fixed_dictionaries(
        {"role": roles, "content": st.one_of(texts(), st.lists(text_part, max_size=4))},
        optional={"name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True)},
    ),
    max_size=8,
)


@pytest.mark.parametrize(("model", "encoding", "tier"), MODELS)
@settings(max_examples=500)
@given(messages=messages_strategy)
def test_count_chat_follows_the_formula(
    reference_tiktoken: dict[str, tiktoken.Encoding],
    model: str,
    encoding: str,
    tier: str,
    messages: list[dict[str, Any]],
) -> None:
    count = REGISTRY.count_chat(model, messages)
    assert count.tokens == _chat_reference(reference_tiktoken[encoding], messages)
    assert count.tier == tier


def test_tool_calls_and_images_make_the_count_approximate(reference_tiktoken: dict[str, tiktoken.Encoding]) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    count = REGISTRY.count_chat("gpt-4o", messages)
    assert count.tier == "approximate"
    assert count.tokens == _chat_reference(reference_tiktoken["o200k_base"], messages)
    image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "data:..."}},
            ],
        }
    ]
    assert REGISTRY.count_chat("gpt-4o", image).tier == "approximate"
    assert REGISTRY.count_chat("gpt-4o", [{"role": "user", "content": "hi"}]).tier == "exact"


class _Broken:
    name = "broken"
    tier = "exact"

    def count(self, text: str) -> int:
        raise RuntimeError("boom")


def test_a_failing_tokenizer_falls_back_to_the_heuristic() -> None:
    registry = TokenizerRegistry([])
    registry._by_model["m"] = _Broken()
    count = registry.count_text("m", "hello world")
    assert (count.tokens, count.tier) == (heuristic_tokens(11), "heuristic")
    chat = registry.count_chat("m", [{"role": "user", "content": "hi"}])
    assert chat.tier == "heuristic"
    assert chat.tokens == 3 + 3 + heuristic_tokens(4) + heuristic_tokens(2)


def test_a_corrupted_vocabulary_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(encodings._SHA256, "cl100k_base", "0" * 64)
    with pytest.raises(encodings.VocabularyError, match="SHA-256"):
        encodings._load_ranks("cl100k_base")


def test_loading_needs_no_network(tmp_path: Any) -> None:
    probe = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise OSError('network blocked by the test')\n"
        "socket.socket.connect = refuse\n"
        "socket.socket.connect_ex = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "from budgetflow.tokenizers import TokenizerRegistry\n"
        "r = TokenizerRegistry.default()\n"
        "print(r.count_text('gpt-4o', 'hello world').tokens, r.count_text('gpt-4', 'hello world').tokens,\n"
        "      r.count_text('claude-3-haiku', 'hello').tier)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "2", "approximate"]


def test_encodings_load_once_per_process() -> None:
    assert encodings.get_encoding("o200k_base") is encodings.get_encoding("o200k_base")
