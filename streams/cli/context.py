"""What every command group shares: the settings, read once and only when a command needs them, and the check that
a command which talks to Kafka has a broker to talk to."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from budgetflow.schemas.errors import BudgetflowError
from budgetflow.schemas.settings import Settings, load_settings

__all__ = ["CONNECT_TIMEOUT_S", "BrokerUnreachable", "Context", "actor_option", "pass_ctx", "unreachable_line"]

# How long a one-shot command waits for a broker to answer before saying there is none: a newcomer without a
# broker hears so at once, and a healthy cluster answers a metadata request well within it.
CONNECT_TIMEOUT_S = 5.0


class BrokerUnreachable(BudgetflowError):
    """No bootstrap server answered a one-shot command (exit status 1, one line)."""


def unreachable_line(servers: str, reason: str) -> str:
    """What a command says when no broker answers: where it tried, why, and how to get one."""
    return (
        f"no Kafka broker answers at {servers} ({reason}); start one with `budgetflow kafka start` or `make run`, "
        "or set BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS to yours"
    )


class Context:
    """Settings are read lazily so that `--help` works even with a bad environment.

    ``needs_kafka`` is set by the root group for the one-shot commands that talk to Kafka: their first read of the
    settings also checks, within ``CONNECT_TIMEOUT_S``, that a broker answers (after the command has checked its
    own arguments and files, before any client starts, so nothing is left half-open).
    """

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self.needs_kafka = False
        self._probed = False

    def settings(self, **overrides: Any) -> Settings:
        if overrides:
            settings = load_settings(**overrides)
        else:
            if self._settings is None:
                self._settings = load_settings()
            settings = self._settings
        if self.needs_kafka and not self._probed:
            self._probe(settings)
        return settings

    def _probe(self, settings: Settings) -> None:
        from budgetflow.streams.kafka.clients import unreachable

        reason = asyncio.run(unreachable(settings.kafka, CONNECT_TIMEOUT_S))
        if reason is not None:
            raise BrokerUnreachable(unreachable_line(settings.kafka.bootstrap_servers, reason))
        self._probed = True


pass_ctx = click.make_pass_decorator(Context, ensure=True)

# Who changes a policy or the ledger, for the audit trail.
actor_option = click.option(
    "--actor", default=None, help="Who makes the change, for the audit trail (default user@host)."
)
