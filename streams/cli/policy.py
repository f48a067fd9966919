"""`budgetflow policy` (apply a policy file) and `budgetflow audit` (the history of policy and ledger changes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from budgetflow.streams.cli.context import Context, actor_option, pass_ctx

__all__ = ["audit", "policy"]


@click.group()
def policy() -> None:
    """Budget policies: limits, soft limits and hard-limit actions."""


@policy.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--prune", is_flag=True, help="Delete budgets that are on the topic but not in FILE.")
@click.option("--dry-run", is_flag=True, help="Print what would change, publish nothing.")
@actor_option
@pass_ctx
def policy_apply(ctx: Context, file: Path, prune: bool, dry_run: bool, actor: str | None) -> None:
    """Validate every budget in FILE (YAML, or TOML if it ends in .toml), then publish what changed.

    Running workers follow without a restart. The whole file is checked before anything connects to Kafka. Every
    change is also appended to the audit topic (`budgetflow audit`). Prints one line per budget: + added,
    ~ changed (field old -> new), - removed; with --dry-run, = for a budget --prune would delete.
    """
    from budgetflow.streams.kafka.topics import Topics, ensure_topics_now
    from budgetflow.streams.ops.audit import default_actor
    from budgetflow.streams.ops.policy_admin import apply_policies, load_policy_file, plan_lines
    from budgetflow.streams.rules.clock import Clock

    wanted = asyncio.run(load_policy_file(file))
    settings = ctx.settings()
    specs = Topics.from_settings(settings)
    if not dry_run:
        asyncio.run(ensure_topics_now(settings, specs))
    result = asyncio.run(
        apply_policies(
            settings,
            specs.policies.name,
            wanted,
            prune=prune,
            dry_run=dry_run,
            audit_topic=specs.audit.name,
            actor=actor or default_actor(),
            now=Clock(settings.clock).now(),
        )
    )
    for line in plan_lines(result):
        click.echo(line)
    counts = (
        f"{len(result.added)} added, {len(result.changed)} changed, {len(result.removed)} removed, "
        f"{len(result.unchanged)} unchanged"
    )
    click.echo(f"dry run: {counts}; nothing was published" if dry_run else f"{counts} (published)", err=True)


# -- audit ----------------------------------------------------------------------
@click.command("audit")
@click.argument("budget", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the AuditRecords as JSON lines.")
@pass_ctx
def audit(ctx: Context, budget: str | None, as_json: bool) -> None:
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
