"""`budgetflow worker` and `budgetflow notify`: the long-running roles."""

from __future__ import annotations

import sys
from typing import Any

import click

from budgetflow.streams.cli.context import Context, pass_ctx

__all__ = ["notify", "worker"]


@click.command("worker")
@click.option(
    "--role",
    type=click.Choice(["enrich", "aggregate", "notify", "all"]),
    required=True,
    envvar="BUDGETFLOW_ROLE",
    show_envvar=True,
    help="enrich prices events; aggregate keeps the ledger; notify posts budget transitions to a webhook; "
    "all runs enrich and aggregate as child processes.",
)
@pass_ctx
def worker(ctx: Context, role: str) -> None:
    """Run a budgetflow worker until SIGTERM or Ctrl-C."""
    settings = ctx.settings()  # fail fast on a bad setting, before any child starts
    from budgetflow.streams.service.process import run_role, supervise

    if role == "all":
        sys.exit(supervise(["enrich", "aggregate"]))
    sys.exit(run_role(role, settings, _role_start(role)))


@click.command("notify")
@pass_ctx
def notify(ctx: Context) -> None:
    """Post each budget transition once to NOTIFY__WEBHOOK_URL (Slack-compatible), until SIGTERM or Ctrl-C."""
    settings = ctx.settings()
    if settings.notify.webhook_url is None:
        raise click.UsageError("set BUDGETFLOW_NOTIFY__WEBHOOK_URL to the webhook to post to")
    from budgetflow.streams.service.process import run_role

    sys.exit(run_role("notify", settings, _role_start("notify")))


def _role_start(role: str) -> Any:
    """The work of a role, imported only when that role runs."""
    if role == "enrich":
        from budgetflow.streams.enrich.worker import run as enrich

        return enrich
    if role == "notify":
        from budgetflow.streams.ops.notify import run as notify

        return notify
    from budgetflow.streams.aggregate.role import run as aggregate

    return aggregate
