"""tiktoken's o200k_base and cl100k_base, built from vocabularies shipped in this package.

The vocabularies are byte-identical to tiktoken's published files; their
SHA-256 is checked on load. Nothing here touches the network, and each
encoding is built once per process, on first use.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import threading
from importlib import resources

import tiktoken

from budgetflow.schemas.errors import ConfigError

__all__ = ["ENCODINGS", "VocabularyError", "get_encoding"]

# The hashes tiktoken itself expects for these files (tiktoken_ext.openai_public).
_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# Split patterns and special tokens as tiktoken_ext.openai_public defines them
# (a unit test compares them with tiktoken's own constructors).
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_SPECIAL = {
    "cl100k_base": {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
    "o200k_base": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
}
_PATTERNS = {"cl100k_base": _CL100K_PAT, "o200k_base": _O200K_PAT}

ENCODINGS = tuple(_SHA256)

_cache: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


class VocabularyError(ConfigError):
    """A shipped vocabulary is missing or does not match its published hash: the installation is broken, and no
    restart mends it."""


def _load_ranks(name: str) -> dict[bytes, int]:
    resource = resources.files("budgetflow.tokenizers").joinpath(f"vocab/{name}.tiktoken.gz")
    try:
        raw = gzip.decompress(resource.read_bytes())
    except (OSError, EOFError) as exc:
        raise VocabularyError(f"vocabulary {name} cannot be read: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _SHA256[name]:
        raise VocabularyError(f"vocabulary {name} has SHA-256 {digest}, expected {_SHA256[name]}")
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding ``cl100k_base`` or ``o200k_base``, built once per process."""
    encoding = _cache.get(name)
    if encoding is not None:
        return encoding
    if name not in _SHA256:
        raise ConfigError(f"no shipped vocabulary for encoding {name!r}; known: {', '.join(ENCODINGS)}")
    with _lock:
        encoding = _cache.get(name)
        if encoding is None:
            encoding = tiktoken.Encoding(
                name=name,
                pat_str=_PATTERNS[name],
                mergeable_ranks=_load_ranks(name),
                special_tokens=_SPECIAL[name],
            )
            _cache[name] = encoding
    return encoding
