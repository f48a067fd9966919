"""`python -m budgetflow.streams` is the `budgetflow` command."""

from budgetflow.streams.cli import main

main()
