"""Unit-test fixtures. ``reference_tiktoken`` is tiktoken itself, independent of our loader.

tiktoken normally downloads its vocabularies; here its own file cache is
seeded with the published files (our shipped copies, whose SHA-256 tiktoken
checks against its own expected hashes), so tiktoken builds its encodings with
its own constructors, patterns and special tokens.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from importlib import resources

import pytest
import tiktoken

_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


@pytest.fixture(scope="session")
def reference_tiktoken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tiktoken.Encoding]]:
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, url in _URLS.items():
        raw = gzip.decompress(
            resources.files("budgetflow.tokenizers").joinpath(f"vocab/{name}.tiktoken.gz").read_bytes()
        )
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(raw)
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    try:
        yield {name: tiktoken.get_encoding(name) for name in (*_URLS, "o200k_harmony")}
    finally:
        mp.undo()
