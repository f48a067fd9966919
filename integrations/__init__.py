"""budgetflow inside gateways people already run. Each integration is an optional extra; importing this package
loads none of them (``budgetflow.integrations.litellm`` needs ``pip install 'budgetflow[litellm]'``)."""
