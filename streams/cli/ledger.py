"""`budgetflow ledger` (adjustments) and `budgetflow report` (spend from a replay of the ledger)."""

from __future__ import annotations

import asyncio

import click

from budgetflow.streams.cli.context import Context, actor_option, pass_ctx

__all__ = ["ledger", "report"]


@click.group()
def ledger() -> None:
    """The ledger: adjustments (credits and debits) that count like any other entry."""


# A credit is a negative amount: "-0.05" must reach USD instead of being read as an option.
@ledger.command("adjust", context_settings={"ignore_unknown_options": True})
@click.argument("budget")
@click.argument("usd")
@click.option("--period", required=True, help="The month it counts in, YYYY-MM (open, or closed within the grace).")
@click.option("--reason", required=True, help="Why, for the audit trail (no secrets).")
@click.option(
    "--id",
    "adjust_id",
    default=None,
    help="Your own id: the command run again with it changes nothing (default: a new one).",
)
@actor_option
@pass_ctx
def ledger_adjust(
    ctx: Context, budget: str, usd: str, period: str, reason: str, adjust_id: str | None, actor: str | None
) -> None:
    """Credit (negative USD) or debit (positive USD) BUDGET in a period, exactly once, with an audit record."""
    from budgetflow.streams.ops.audit import default_actor
    from budgetflow.streams.ops.ledger_tools import adjust as do_adjust
    from budgetflow.streams.rules.clock import Clock

    settings = ctx.settings()
    entry = asyncio.run(
        do_adjust(
            settings,
            budget,
            usd,
            period=period,
            reason=reason,
            adjust_id=adjust_id,
            actor=actor or default_actor(),
            now=Clock(settings.clock).now(),
        )
    )
    click.echo(entry.entry_id)


@click.command("report")
@click.option("--period", default=None, help="The month, YYYY-MM (default: every month in the ledger).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@pass_ctx
def report(ctx: Context, period: str | None, fmt: str) -> None:
    """Spend per budget, model, provider, backend and tier, from a replay of the ledger (not the tables).

    Amounts are exact decimal USD strings; each budget's rows add up to exactly what the aggregate holds.
    """
    import re

    from budgetflow.streams.ops.ledger_tools import render_report
    from budgetflow.streams.ops.ledger_tools import report as build_report

    if period is not None and not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", period):
        raise click.BadParameter(f"{period!r} is not YYYY-MM", param_hint="--period")
    rows, skipped = asyncio.run(build_report(ctx.settings(), period))
    click.echo(render_report(rows, fmt), nl=False)
    if skipped:
        click.echo(f"{skipped} ledger records were not entries (they are in the DLQ) and count nowhere", err=True)
