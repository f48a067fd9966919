"""What every command group shares: the settings, read once and only when a command needs them."""

from __future__ import annotations

from typing import Any

import click

from budgetflow.schemas.settings import Settings, load_settings

__all__ = ["Context", "actor_option", "pass_ctx"]


class Context:
    """Settings are read lazily so that `--help` works even with a bad environment."""

    def __init__(self) -> None:
        self._settings: Settings | None = None

    def settings(self, **overrides: Any) -> Settings:
        if overrides:
            return load_settings(**overrides)
        if self._settings is None:
            self._settings = load_settings()
        return self._settings


pass_ctx = click.make_pass_decorator(Context, ensure=True)

# Who changes a policy or the ledger, for the audit trail.
actor_option = click.option(
    "--actor", default=None, help="Who makes the change, for the audit trail (default user@host)."
)
