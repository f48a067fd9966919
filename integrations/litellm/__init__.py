"""budgetflow for a LiteLLM proxy: exact budgets, the shift from cloud to local models, the status topic.

In the proxy's ``config.yaml`` (docs/litellm.md)::

    litellm_settings:
      callbacks: budgetflow.integrations.litellm.callback

with budgetflow's settings in the proxy's environment (``BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS``,
``BUDGETFLOW_LITELLM__LOCAL_MODELS='{"gpt-4o": "llama3.1"}'``, ...). Needs ``pip install 'budgetflow[litellm]'``.
``callback`` is made on first access, once per process, from the settings in the environment; a bad setting
stops the proxy at start with one line naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from budgetflow.integrations.litellm.callback import BudgetflowCallback

__all__ = ["BudgetflowCallback", "callback"]

_made: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name == "BudgetflowCallback":
        from budgetflow.integrations.litellm.callback import BudgetflowCallback

        return BudgetflowCallback
    if name == "callback":
        if "callback" not in _made:
            from budgetflow.integrations.litellm.callback import BudgetflowCallback

            _made["callback"] = BudgetflowCallback()
        return _made["callback"]
    raise AttributeError(name)
