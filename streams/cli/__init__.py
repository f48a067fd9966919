"""The `budgetflow` command: one console script, one subcommand per job."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import click

from budgetflow.schemas.errors import BudgetflowError
from budgetflow.schemas.settings import Settings, load_settings, setting_rows

__all__ = ["main", "settings_markdown"]


class _Context:
    """Settings are read lazily so that `--help` works even with a bad environment."""

    def __init__(self) -> None:
        self._settings: Settings | None = None

    def settings(self, **overrides: Any) -> Settings:
        if overrides:
            return load_settings(**overrides)
        if self._settings is None:
            self._settings = load_settings()
        return self._settings


pass_ctx = click.make_pass_decorator(_Context, ensure=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="budgetflow")
def cli() -> None:
    """budgetflow: exact monthly LLM inference budgets on Apache Kafka.

    Every option can also be set by the environment variable shown beside it;
    `budgetflow settings` lists every setting.
    """


@cli.command("settings")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "markdown"]),
    default="table",
    help="markdown prints the table the README carries.",
)
@click.option(
    "--write",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Replace the table between <!-- settings:begin/end --> in this file (the README).",
)
def settings_cmd(fmt: str, write: Path | None) -> None:
    """List every setting: environment variable, default, meaning."""
    if write is not None:
        text = write.read_text()
        begin, end = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"
        if begin not in text or end not in text:
            raise click.BadParameter(f"{write} has no settings markers", param_hint="--write")
        head, rest = text.split(begin, 1)
        write.write_text(head + begin + settings_markdown() + end + rest.split(end, 1)[1])
        return
    if fmt == "markdown":
        click.echo(settings_markdown())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("variable", "default", "meaning", box=None)
    for name, default, description in setting_rows():
        table.add_row(name, default, description)
    Console().print(table)


def settings_markdown() -> str:
    """The settings as a Markdown table (the README's copy is checked against it)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, default, description in setting_rows():
        shown = f"`{default}`" if default else ""
        lines.append(f"| `{name}` | {shown} | {description.replace('|', '/')} |")
    return "\n".join(lines)


# -- schema -------------------------------------------------------------------
@cli.group()
def schema() -> None:
    """The wire contract as JSON Schema, for gateways in other languages."""


@schema.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def schema_export(directory: Path) -> None:
    """Write one <Event>.schema.json per wire event into DIRECTORY."""
    from budgetflow.schemas.jsonschema import export_json_schemas

    for path in export_json_schemas(directory):
        click.echo(str(path))


# -- workers ------------------------------------------------------------------
@cli.command("worker")
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
def worker(ctx: _Context, role: str) -> None:
    """Run a budgetflow worker until SIGTERM or Ctrl-C."""
    settings = ctx.settings()  # fail fast on a bad setting, before any child starts
    from budgetflow.streams.service.process import run_role, supervise

    if role == "all":
        sys.exit(supervise(["enrich", "aggregate"]))
    sys.exit(run_role(role, settings, _role_start(role)))


@cli.command("notify")
@pass_ctx
def notify(ctx: _Context) -> None:
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
    from budgetflow.streams.aggregate.worker import run as aggregate

    return aggregate


@cli.group()
def topics() -> None:
    """The Kafka topics budgetflow uses."""


@topics.command("create")
@pass_ctx
def topics_create(ctx: _Context) -> None:
    """Create every topic with its configuration (and check existing ones)."""
    from budgetflow.streams.kafka.topics import Topics, ensure_topics_now

    settings = ctx.settings()
    specs = Topics.from_settings(settings)
    asyncio.run(ensure_topics_now(settings, specs))
    for spec in specs.all():
        click.echo(f"{spec.name}\t{spec.partitions}\t{spec.config.get('cleanup.policy', 'delete')}")


# -- policies -------------------------------------------------------------------
_actor = click.option("--actor", default=None, help="Who makes the change, for the audit trail (default user@host).")


@cli.group()
def policy() -> None:
    """Budget policies: limits, soft limits and hard-limit actions."""


@policy.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--prune", is_flag=True, help="Delete budgets that are on the topic but not in FILE.")
@click.option("--dry-run", is_flag=True, help="Print what would change, publish nothing.")
@_actor
@pass_ctx
def policy_apply(ctx: _Context, file: Path, prune: bool, dry_run: bool, actor: str | None) -> None:
    """Validate every budget in FILE, then publish what changed; running workers follow without a restart.

    Every change is also appended to the audit topic (`budgetflow audit`).
    """
    from budgetflow.schemas.money import format_usd
    from budgetflow.streams.kafka.topics import Topics, ensure_topics_now
    from budgetflow.streams.ops.audit import default_actor
    from budgetflow.streams.ops.policy_admin import apply_policy_file
    from budgetflow.streams.rules.clock import Clock

    settings = ctx.settings()
    specs = Topics.from_settings(settings)
    if not dry_run:
        asyncio.run(ensure_topics_now(settings, specs))
    result = asyncio.run(
        apply_policy_file(
            settings,
            specs.policies.name,
            file,
            prune=prune,
            dry_run=dry_run,
            audit_topic=specs.audit.name,
            actor=actor or default_actor(),
            now=Clock(settings.clock).now(),
        )
    )

    def limit(p: Any) -> str:
        return "unlimited" if p.monthly_limit_usd is None else "$" + format_usd(p.monthly_limit_usd, 2)

    for p in result.added:
        click.echo(f"+ {p.id}: {limit(p)}, soft {p.soft_limit_percent} %, {p.hard_limit_action}")
    for old, new in result.changed:
        fields = [f for f in type(new).model_fields if getattr(old, f) != getattr(new, f)]
        click.echo(f"~ {new.id}: " + ", ".join(f"{f} {getattr(old, f)!s} -> {getattr(new, f)!s}" for f in fields))
    for budget in result.removed:
        click.echo(f"- {budget}")
    verb = "would change" if dry_run else "changed"
    click.echo(
        f"{len(result.added)} added, {len(result.changed)} changed, {len(result.removed)} removed, "
        f"{len(result.unchanged)} unchanged ({verb})",
        err=True,
    )


# -- audit and adjustments --------------------------------------------------------
@cli.command("audit")
@click.argument("budget", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the AuditRecords as JSON lines.")
@pass_ctx
def audit(ctx: _Context, budget: str | None, as_json: bool) -> None:
    """The history of policy changes and ledger adjustments, of one BUDGET or all, oldest first."""
    from budgetflow.schemas.money import format_usd
    from budgetflow.schemas.serde import dumps
    from budgetflow.streams.kafka.topics import Topics
    from budgetflow.streams.ops.audit import read_audit

    settings = ctx.settings()
    records = asyncio.run(read_audit(settings, Topics.from_settings(settings).audit.name, budget))
    for r in records:
        if as_json:
            click.echo(dumps(r.model_dump(mode="json")).decode())
            continue
        who = r.actor + (f" ({r.principal})" if r.principal else "")
        if r.kind == "adjust":
            amount = format_usd(r.amount_usd or 0, 2)
            sign = "+" if (r.amount_usd or 0) >= 0 else ""
            what = f"adjust {r.period} {sign}${amount}: {r.reason} [{r.entry_id}]"
        else:
            old, new = r.old or {}, r.new or {}
            if not old:
                what = "created " + ", ".join(f"{k}={v}" for k, v in new.items() if k != "id")
            elif not new:
                what = "deleted"
            else:
                what = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)
            what = f"policy r{r.revision}: {what}"
        click.echo(f"{r.at.isoformat()}\t{r.budget_id}\t{who}\t{what}")
    if not records:
        click.echo("no audit records" + (f" for {budget}" if budget else ""), err=True)


@cli.group()
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
@_actor
@pass_ctx
def ledger_adjust(
    ctx: _Context, budget: str, usd: str, period: str, reason: str, adjust_id: str | None, actor: str | None
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


@cli.command("report")
@click.option("--period", default=None, help="The month, YYYY-MM (default: every month in the ledger).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@pass_ctx
def report(ctx: _Context, period: str | None, fmt: str) -> None:
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


# -- status ---------------------------------------------------------------------
@cli.command("status")
@click.argument("budget", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the BudgetStatus records as JSON lines.")
@pass_ctx
def status_cmd(ctx: _Context, budget: str | None, as_json: bool) -> None:
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
@cli.group()
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
def view_serve(ctx: _Context, port: int, host: str) -> None:
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


# -- simulate -------------------------------------------------------------------
@cli.group()
def simulate() -> None:
    """Simulations of routing policy (no broker needed)."""


@simulate.command("shift")
@click.option("--requests", default=200_000, show_default=True, help="Requests in the simulated month.")
@click.option("--seed", default=1, show_default=True, help="Random seed.")
@click.option("--overspend", default=1.6, show_default=True, help="Cloud cost of the traffic, times the limit.")
def simulate_shift_cmd(requests: int, seed: int, overspend: float) -> None:
    """A month of traffic with and without the soft-limit shift: cloud spend in the 80-100 % band."""
    from budgetflow.schemas.money import format_usd
    from budgetflow.streams.dev.simulate import simulate_shift

    r = simulate_shift(requests, seed, overspend)
    days = (r.band_start_s / 86_400, r.band_end_s / 86_400)
    click.echo(
        f"budget ${format_usd(r.limit_pico, 2)}, soft limit 75 %, {r.requests:,} requests whose cloud cost "
        f"is {overspend:g} x the limit"
    )
    click.echo(f"80-100 % band of the run without the shift: day {days[0]:.1f} to day {days[1]:.1f}")
    click.echo(
        f"cloud spend in that band: without the shift ${format_usd(r.without_band_spend, 2)}, "
        f"with it ${format_usd(r.with_band_spend, 2)}: {r.reduction_percent:.1f} % less"
    )
    click.echo(f"cloud requests over the month: {r.without_cloud_requests:,} without, {r.with_cloud_requests:,} with")


# -- demo -----------------------------------------------------------------------
@cli.command("demo")
@click.option(
    "--duration",
    default=60.0,
    show_default=True,
    envvar="BUDGETFLOW_DEMO_DURATION_S",
    show_envvar=True,
    help="Wall-clock seconds the simulated month lasts.",
)
@click.option("--requests", default=3000, show_default=True, help="Requests sent through the gateway.")
@click.option("--seed", default=2026, show_default=True, help="Random seed of the traffic.")
@click.option("--keep-running", is_flag=True, help="Leave the workers, gateway and broker up after the summary.")
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the summary as JSON here.",
)
@pass_ctx
def demo(
    ctx: _Context, duration: float, requests: int, seed: int, keep_running: bool, summary_json: Path | None
) -> None:
    """A month of LLM traffic through the real pipeline in about a minute, watched live."""
    from budgetflow.streams.dev.demo import DemoConfig, run_demo

    config = DemoConfig(
        duration_s=duration, requests=requests, seed=seed, keep_running=keep_running, summary_json=summary_json
    )
    sys.exit(run_demo(config, ctx.settings()))


# -- bench --------------------------------------------------------------------
@cli.command("bench")
@click.option("--only", multiple=True, help="Run only this section (repeatable).")
@click.option("--quick", is_flag=True, envvar="BUDGETFLOW_BENCH_QUICK", show_envvar=True, help="Tiny sizes (for CI).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench-results/bench.json"),
    help="Where the JSON results go.",
)
def bench(only: tuple[str, ...], quick: bool, out: Path) -> None:
    """Measure budgetflow beside its baselines in the same run; print a table, write JSON."""
    from budgetflow.streams.dev.bench import run_bench
    from budgetflow.streams.dev.bench_report import render

    try:
        results = run_bench(list(only) or None, quick, out)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--only") from exc
    click.echo(render(results))
    click.echo(f"\nresults: {out}")


# -- kafka --------------------------------------------------------------------
@cli.group()
def kafka() -> None:
    """A local single-node Apache Kafka (KRaft) for development, tests and the demo."""


_data_dir = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="BUDGETFLOW_DATA_DIR",
    show_envvar=True,
    default=None,
    help="Directory for the broker's data (default .budgetflow).",
)


def _local_kafka(ctx: _Context, data_dir: Path | None, port: int | None = None, secure: Path | None = None) -> Any:
    from budgetflow.streams.dev.localkafka import LocalKafka

    settings = ctx.settings()
    local = settings.local_kafka
    if port is not None:
        local = local.model_copy(update={"port": port})
    return LocalKafka(data_dir or settings.data_dir, local, secure_dir=secure, topic_prefix=settings.topics.prefix)


@kafka.command("start")
@_data_dir
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    envvar="BUDGETFLOW_LOCAL_KAFKA__PORT",
    show_envvar=True,
    default=None,
    help="Client port on 127.0.0.1; 0 picks a free one (default: the port used last time, else 9092).",
)
@click.option(
    "--secure",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run with SASL/SCRAM over TLS and ACLs; certificates, credentials and a <role>.env per principal "
    "(admin, worker, router, gateway) are kept in this directory. Only on a new data dir.",
)
@pass_ctx
def kafka_start(ctx: _Context, data_dir: Path | None, port: int | None, secure: Path | None) -> None:
    """Start the broker (fetching it through Maven once), wait until ready, print its address.

    Harmless when it is already running: it prints the address again. A broker first started with --secure
    stays secure on later starts.
    """
    broker = _local_kafka(ctx, data_dir, port, secure)
    began = time.monotonic()
    was_running = broker.pid() is not None
    address = broker.start()
    if not was_running:
        click.echo(
            f"kafka ready in {time.monotonic() - began:.1f} s (pid {broker.pid()}, data {broker.home})", err=True
        )
    if broker.secure is not None:
        files = broker.secure.write_env_files(address)
        click.echo(f"SASL_SSL with ACLs; settings per principal (source one): {', '.join(map(str, files))}", err=True)
    click.echo(address)


@kafka.command("stop")
@_data_dir
@pass_ctx
def kafka_stop(ctx: _Context, data_dir: Path | None) -> None:
    """Stop the broker with a controlled shutdown."""
    broker = _local_kafka(ctx, data_dir)
    click.echo("kafka stopped" if broker.stop() else "kafka was not running", err=True)


@kafka.command("status")
@_data_dir
@pass_ctx
def kafka_status(ctx: _Context, data_dir: Path | None) -> None:
    """Print the broker's address if it runs; exit 1 if it does not."""
    broker = _local_kafka(ctx, data_dir)
    if broker.pid() is None:
        click.echo("kafka is not running", err=True)
        sys.exit(1)
    click.echo(broker.bootstrap())


def main() -> None:
    """Entry point: our errors become one line on stderr and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BudgetflowError as exc:
        click.echo(f"budgetflow: {exc}", err=True)
        sys.exit(2)
