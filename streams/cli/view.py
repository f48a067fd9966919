"""`budgetflow status` (every budget's status) and `budgetflow view` (the router's view over HTTP)."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from budgetflow.streams.cli.context import Context, pass_ctx

__all__ = ["status_cmd", "view"]


# -- status ---------------------------------------------------------------------
@click.command("status")
@click.argument("budget", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the BudgetStatus records as JSON lines.")
@pass_ctx
def status_cmd(ctx: Context, budget: str | None, as_json: bool) -> None:
    """Every budget's current status (or one budget's), read from the status topic."""
    from rich.console import Console
    from rich.table import Table

    from budgetflow.schemas.money import format_usd
    from budgetflow.schemas.serde import dumps
    from budgetflow.streams.kafka.topics import Topics
    from budgetflow.streams.ops.readback import read_heartbeats, read_statuses
    from budgetflow.streams.rules.clock import Clock

    settings = ctx.settings()
    specs = Topics.from_settings(settings)

    async def read() -> tuple[Any, Any]:
        return await read_statuses(settings, specs.status.name), await read_heartbeats(settings, specs.heartbeats.name)

    statuses, beats = asyncio.run(read())
    rows = [s for b, s in sorted(statuses.items()) if budget is None or b == budget]
    if budget is not None and not rows:
        raise click.ClickException(f"no status for budget {budget!r} yet")
    if as_json:
        for record in rows:
            click.echo(dumps(record).decode())
        return
    now = Clock(settings.clock).now()
    table = Table("budget", "period", "status", "spend", "limit", "utilization", "next reset", "freshness", box=None)
    for s in rows:
        beat = beats.get(s.partition)
        age = (now - beat.as_of).total_seconds() if beat is not None else None
        fresh = "no heartbeat" if age is None else f"heartbeat {age:.0f} s ago"
        table.add_row(
            s.budget_id,
            s.period,
            s.status,
            "$" + format_usd(s.spend_usd, 2),
            "unlimited" if s.limit_usd is None else "$" + format_usd(s.limit_usd, 2),
            "-" if s.utilization_percent is None else f"{s.utilization_percent:.2f} %",
            s.next_reset.isoformat(),
            fresh,
        )
    Console(width=200).print(table)


# -- view -----------------------------------------------------------------------
@click.group()
def view() -> None:
    """The router's view of the budgets."""


@view.command("serve")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8086,
    envvar="BUDGETFLOW_VIEW_PORT",
    show_envvar=True,
    help="Port to listen on.",
)
@click.option("--host", default="127.0.0.1", envvar="BUDGETFLOW_VIEW_HOST", show_envvar=True, help="Interface.")
@pass_ctx
def view_serve(ctx: Context, port: int, host: str) -> None:
    """Serve a BudgetView over HTTP (POST /v1/decide, POST /v1/admit, GET /v1/status/ID) for non-Python gateways."""
    from aiohttp import web

    from budgetflow.streams.gateway.view import BudgetView
    from budgetflow.streams.gateway.viewserver import view_app

    settings = ctx.settings()
    token = settings.web.bearer_token

    async def app() -> web.Application:
        budget_view = BudgetView(settings)
        await budget_view.start()
        application = view_app(budget_view, token.get_secret_value() if token else None)

        async def close(_: web.Application) -> None:
            await budget_view.stop()

        application.on_cleanup.append(close)
        return application

    web.run_app(app(), host=host, port=port, print=lambda text: click.echo(text, err=True))
