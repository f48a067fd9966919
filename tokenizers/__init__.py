"""Token counting and pricing for budgetflow, installed as ``budgetflow.tokenizers``.

Installed under the ``budgetflow`` namespace so that it never shadows
HuggingFace's ``tokenizers`` package in a user's environment.
"""

from __future__ import annotations

__all__: list[str] = []
