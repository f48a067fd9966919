"""Which budgets a LiteLLM caller is charged to, decided by its credentials (never by what the request says).

Every request is charged to its key's own budget, ``key:`` and the first 8 hex digits of the key's SHA-256 (the
key itself is never published), to ``team:<team_id>`` when the key belongs to a team, and to the budgets listed
under ``budgetflow_budgets`` in the key's or the team's metadata; the aggregate adds ``global``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from budgetflow.schemas.events import BUDGET_ID_PATTERN

__all__ = ["METADATA_FIELD", "BudgetsError", "charged_budgets", "key_budget"]

METADATA_FIELD = "budgetflow_budgets"
_BUDGET = re.compile(BUDGET_ID_PATTERN)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BudgetsError(ValueError):
    """A key's or team's settings name no valid budget: the operator's mistake, said in one line."""


def key_budget(token: str) -> str:
    """``key:`` and 8 hex digits of the key's SHA-256.

    LiteLLM hands its hooks the SHA-256 of an ``sk-`` key (its ``token``); any other credential (the master key's
    marker, a custom auth's key) arrives as it is and is hashed here, so no credential is ever published.
    """
    digest = token if _SHA256.match(token) else hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    return "key:" + digest[:8]


def _listed(metadata: Any, whose: str) -> list[str]:
    if not isinstance(metadata, Mapping) or metadata.get(METADATA_FIELD) is None:
        return []
    listed = metadata[METADATA_FIELD]
    if isinstance(listed, str):
        listed = [b.strip() for b in listed.split(",") if b.strip()]
    if not isinstance(listed, Sequence) or not all(isinstance(b, str) for b in listed):
        raise BudgetsError(f"the {whose} metadata's {METADATA_FIELD} must be a list of budget ids")
    for budget in listed:
        if not _BUDGET.match(budget):
            raise BudgetsError(f"the {whose} metadata's {METADATA_FIELD} names {budget!r}, which is not a budget id")
    return list(listed)


def charged_budgets(auth: Any) -> list[str]:
    """The budgets of a request made with ``auth`` (LiteLLM's ``UserAPIKeyAuth``), in a stable order, no repeats.

    Raises :class:`BudgetsError` when the key's team id or a metadata list cannot name a budget.
    """
    token = getattr(auth, "token", None) or getattr(auth, "api_key", None)
    budgets = [key_budget(token)] if isinstance(token, str) and token else []
    team = getattr(auth, "team_id", None)
    if team:
        if not _BUDGET.match(f"team:{team}"):
            raise BudgetsError(f"team id {team!r} cannot name a budget (lower-case letters, digits, ':._-')")
        budgets.append(f"team:{team}")
    budgets += _listed(getattr(auth, "metadata", None), "key")
    budgets += _listed(getattr(auth, "team_metadata", None), "team")
    return list(dict.fromkeys(budgets))
