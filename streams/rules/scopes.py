"""Which budgets a request is charged to: those the gateway names, those whose policy's ``applies_to`` matches
it, every parent of those, and ``global``.

Enrich follows the policies topic and asks a :class:`BudgetResolver` for each request and usage event, so a
per-model cap ("all GPT-4-class models <= $500") or a team -> org -> global roll-up is charged without any
gateway knowing it. A reserve and its settle resolve alike (the settle matches on the request's model, and
the publisher copies the request's metadata), unless the policies change between the two.

Budget ids a gateway names that have no policy follow ``UNKNOWN_BUDGET``: ``default`` charges them under
the default policy, ``ignore`` drops them, ``dlq`` sends the event to the DLQ as ``unknown_budget``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import GLOBAL_BUDGET
from budgetflow.schemas.policy import BudgetPolicy, Scope
from budgetflow.streams.rules.shards import account, shard_count

__all__ = ["BudgetResolver", "UnknownBudget", "with_global"]

UnknownBudget = Literal["default", "ignore", "dlq"]
_MAX_DEPTH = 32


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern.lower()))


class _Compiled:
    """A scope with its globs compiled once."""

    def __init__(self, budget: str, scope: Scope) -> None:
        self.budget = budget
        self.provider = scope.provider.lower() if scope.provider else None
        self.backend = scope.backend
        self.model = _glob(scope.model) if scope.model else None
        self.metadata = [(k, _glob(v)) for k, v in scope.metadata.items()]

    def matches(self, model: str, provider: str, backend: str, metadata: Mapping[str, str]) -> bool:
        if self.provider is not None and provider.lower() != self.provider:
            return False
        if self.backend is not None and backend != self.backend:
            return False
        if self.model is not None and not self.model.match(model.lower()):
            return False
        for key, pattern in self.metadata:
            value = metadata.get(key)
            if value is None or not pattern.match(value.lower()):
                return False
        return True


class BudgetResolver:
    """Resolves a request's budgets from the policies it is given (``policies()`` is read on every call; the
    scopes are compiled again after :meth:`invalidate`, which the policy follower calls on every change)."""

    def __init__(
        self,
        policies: Callable[[], Mapping[str, BudgetPolicy]],
        unknown: UnknownBudget = "default",
        on_unknown: Callable[[str], None] | None = None,
        global_shards: int = 1,
    ) -> None:
        self._policies = policies
        self.global_shards = global_shards
        self.unknown = unknown
        self._on_unknown = on_unknown
        self._dirty = True
        self._scoped: list[_Compiled] = []

    def invalidate(self, _budget: str | None = None) -> None:
        self._dirty = True

    @property
    def has_scopes(self) -> bool:
        """Whether any policy has ``applies_to`` (if none, a request's budgets do not depend on its model)."""
        self._index()
        return bool(self._scoped)

    def _index(self) -> Mapping[str, BudgetPolicy]:
        policies = self._policies()
        if self._dirty:
            self._dirty = False
            self._scoped = [_Compiled(p.id, p.applies_to) for p in policies.values() if p.applies_to is not None]
        return policies

    def accounts(self, budgets: list[str], request_id: str) -> list[tuple[str, str]]:
        """(budget, ledger account) for each budget: a sharded budget's entry goes to the request's shard."""
        policies = self._policies()
        out = []
        for budget in budgets:
            shards = shard_count(budget, policies, self.global_shards)
            out.append((budget, budget if shards == 1 else account(budget, request_id, shards)))
        return out

    def resolve(
        self, listed: Sequence[str], *, model: str, provider: str, backend: str, metadata: Mapping[str, str]
    ) -> list[str]:
        """The budgets to charge, each once, in a stable order: listed, scoped, parents, then global."""
        policies = self._index()
        out: dict[str, None] = {}
        for budget in listed:
            if budget not in policies and budget != GLOBAL_BUDGET:
                if self._on_unknown is not None:
                    self._on_unknown(budget)
                if self.unknown == "ignore":
                    continue
                if self.unknown == "dlq":
                    raise InvalidEvent("unknown_budget", f"budgets: {budget!r} has no policy (UNKNOWN_BUDGET=dlq)")
            out[budget] = None
        for scope in self._scoped:
            if scope.matches(model, provider, backend, metadata):
                out[scope.budget] = None
        for budget in list(out):
            parent, depth = policies[budget].parent if budget in policies else None, 0
            while parent is not None and depth < _MAX_DEPTH:  # policy files refuse cycles; the bound is a guard
                out[parent] = None
                parent = policies[parent].parent if parent in policies else None
                depth += 1
        return with_global(out)


def with_global(budgets: Iterable[str]) -> list[str]:
    """The budgets a request is charged to: those given, each once, in their order, and ``global`` (every request
    is charged to it, whether it names it or not)."""
    listed = list(budgets)
    if GLOBAL_BUDGET not in listed and len(set(listed)) == len(listed):
        return [*listed, GLOBAL_BUDGET]  # the common case, without building a dict
    return list(dict.fromkeys([*listed, GLOBAL_BUDGET]))
