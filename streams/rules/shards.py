"""Hot budgets: a sharded budget's spend is summed on several ledger partitions, then merged on one.

A budget with ``shards: K`` in its policy (``global`` with ``GLOBAL_SHARDS``, or by default in a large
deployment) has its reserve and settle entries keyed ``budget#k``, with ``k`` from the request id, so that a
request's entries meet on one shard and each shard is an ordinary ledger account on its own partition. The
worker that owns a shard sends the shard's sums to the budget's *home* partition (the one ``budget`` itself
keys) as a ``partial`` entry after every batch that changed them; the home keeps each shard's latest sums and
judges the budget's status on their total, as it would judge an unsharded budget (docs/architecture.md,
"Hot budgets").
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from budgetflow.schemas.events import GLOBAL_BUDGET, SHARD_MARK
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.settings import Settings

__all__ = ["account", "auto_global_shards", "global_shards", "home_of", "is_leased", "shard_count", "shard_of"]

# Below this many ledger partitions a deployment is small: one worker takes global's rate.
LARGE_DEPLOYMENT_PARTITIONS = 24


def auto_global_shards(partitions: int) -> int:
    """Global's shards when neither its policy nor ``GLOBAL_SHARDS`` says: 1 in a small deployment, else one per
    eight ledger partitions (every request is charged to global, so it is the first budget to run hot)."""
    return 1 if partitions < LARGE_DEPLOYMENT_PARTITIONS else partitions // 8


def global_shards(settings: Settings) -> int:
    """Global's shards when its policy does not say: ``GLOBAL_SHARDS``, or :func:`auto_global_shards`."""
    return settings.global_shards or auto_global_shards(settings.topics.partitions)


def is_leased(policy: BudgetPolicy, global_shard_count: int) -> bool:
    """Whether routers lease a budget's headroom: :attr:`BudgetPolicy.leased`, and global is not sharded by the
    settings (a sharded budget's reserves land on its shards, where no lease is)."""
    return policy.leased and not (policy.id == GLOBAL_BUDGET and policy.shards is None and global_shard_count > 1)


def shard_count(budget: str, policies: Mapping[str, BudgetPolicy], global_shards: int) -> int:
    """How many shards a budget's spend is summed on."""
    policy = policies.get(budget)
    if policy is not None and policy.shards is not None:
        return policy.shards
    return global_shards if budget == GLOBAL_BUDGET else 1


def shard_of(request_id: str, shards: int) -> int:
    """The shard a request's entries go to: the same for its reserve and its settle, on every worker."""
    return zlib.crc32(request_id.encode()) % shards


def account(budget: str, request_id: str, shards: int) -> str:
    """The ledger account a request's entry for ``budget`` is counted on: the budget itself, or one of its shards."""
    return budget if shards <= 1 else f"{budget}{SHARD_MARK}{shard_of(request_id, shards)}"


def home_of(account_id: str) -> tuple[str, int | None]:
    """The budget an account belongs to, and its shard (None for a budget's own account)."""
    budget, mark, shard = account_id.partition(SHARD_MARK)
    return (budget, int(shard)) if mark else (budget, None)
