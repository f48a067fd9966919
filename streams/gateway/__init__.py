"""What gateways and routers run: the publisher (and its write-ahead spool), usage extraction, the BudgetView and
its routing rule, ``view serve`` for gateways in other languages (docs/gateways.md). ``budgetflow.streams``
re-exports the public names; importing them loads no worker code.
"""
