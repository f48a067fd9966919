"""LiteLLM's ``custom_auth`` hook for the example proxy: API keys and their teams from ``keys.yaml`` beside it.

The proxy's config names it (``general_settings: {custom_auth: auth.user_api_key_auth}``, a path LiteLLM resolves
next to the config file); LiteLLM's own key database needs Prisma, which this replaces. The key file holds the
SHA-256 of each key, never the key; a request's key is hashed and compared with every entry. The key reaches
budgetflow as its hash, so its budget is ``key:`` and the first 8 hex digits of it, as in examples/keys.yaml; its
team is ``team:<team>``; ``budgets`` become the key's ``budgetflow_budgets`` metadata. The proxy's master key is
let through as LiteLLM lets it through without a custom auth. A key not listed is a 401.
"""

# No `from __future__ import annotations`: LiteLLM loads this file without registering it as a module, so pydantic
# could not resolve the models' annotations later; they are evaluated now instead.
import hashlib
import hmac
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from fastapi import HTTPException, Request
from litellm.constants import LITELLM_PROXY_MASTER_KEY_ALIAS
from litellm.proxy._types import LitellmUserRoles, UserAPIKeyAuth
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from budgetflow.schemas.events import BudgetId

KEY_FILE = Path(__file__).with_name("keys.yaml")
_TEAM = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class _Key(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64)
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    team: Annotated[str, StringConstraints(pattern=_TEAM)] | None = None
    budgets: list[BudgetId] = Field([], max_length=64)


class _KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    keys: list[_Key] = Field(min_length=1)


def load_keys(path: Path = KEY_FILE) -> list[_Key]:
    """The key file, checked; a bad one stops the proxy at start."""
    keys = _KeyFile.model_validate(yaml.safe_load(path.read_text())).keys
    if len({k.sha256 for k in keys}) != len(keys):
        raise ValueError(f"{path}: a key is listed twice")
    return keys


KEYS = load_keys()


def _master_key() -> str | None:
    from litellm.proxy import proxy_server

    master = proxy_server.master_key
    return master if isinstance(master, str) and master else None


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """The caller of ``request``: its key's name, team and budgets; a 401 for a key not in the file."""
    key = re.sub(r"^[Bb]earer\s+", "", api_key or "").strip()
    master = _master_key()
    if master is not None and hmac.compare_digest(key.encode(), master.encode()):
        return UserAPIKeyAuth(api_key=LITELLM_PROXY_MASTER_KEY_ALIAS, user_role=LitellmUserRoles.PROXY_ADMIN)
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    found: Any = None
    for entry in KEYS:  # every entry compared, in constant time each
        if hmac.compare_digest(entry.sha256, digest):
            found = entry
    if found is None or not key:
        raise HTTPException(status_code=401, detail="invalid API key")
    # The hash, not the key: LiteLLM logs and hands on what it is given, and budgetflow names the key by it.
    return UserAPIKeyAuth(
        api_key=digest,
        key_alias=found.name,
        team_id=found.team,
        metadata={"budgetflow_budgets": list(found.budgets)},
    )
