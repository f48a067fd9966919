"""A real LiteLLM proxy for the tests: budgetflow.streams.dev.litellm_proxy (shared with `budgetflow litellm` and
the bench), models mocked with LiteLLM's ``mock_response`` (no provider is called), keys and teams from its custom
auth hook, and budgetflow's callback loaded the way docs/litellm.md says, with the pipeline's settings in its
environment."""

from __future__ import annotations

import hashlib

from budgetflow.streams.dev.litellm_proxy import NOT_INSTALLED, Proxy, chat, installed
from budgetflow.streams.dev.litellm_proxy import mocked_model as model

__all__ = ["HAVE_LITELLM", "SKIP_REASON", "Proxy", "chat", "key_budget", "model"]

HAVE_LITELLM = installed()
SKIP_REASON = f"{NOT_INSTALLED} (CI installs it)"


def key_budget(key: str) -> str:
    """The budget of an ``sk-`` key as the integration names it."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]
