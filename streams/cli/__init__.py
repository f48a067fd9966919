"""The `budgetflow` command: one console script, one subcommand per job.

The root group and ``main`` live here; each group of commands in a module of its own (settings, schema, worker,
kafka, policy, ledger, view, dev, litellm), added to the root below. Every command imports its work when it runs, so
that `--help` and a bad environment stay cheap.
"""

from __future__ import annotations

import sys

import click

from budgetflow.schemas.errors import BudgetflowError
from budgetflow.streams.cli.context import BrokerUnreachable, Context, unreachable_line
from budgetflow.streams.cli.dev import bench, demo, simulate
from budgetflow.streams.cli.kafka import kafka, topics
from budgetflow.streams.cli.ledger import ledger, report
from budgetflow.streams.cli.litellm import litellm
from budgetflow.streams.cli.policy import audit, policy
from budgetflow.streams.cli.schema import schema
from budgetflow.streams.cli.settings import settings_cmd, settings_markdown
from budgetflow.streams.cli.view import status_cmd, view
from budgetflow.streams.cli.worker import notify, worker

__all__ = ["cli", "main", "settings_markdown"]


# The one-shot commands that talk to Kafka: no broker is one line and exit status 1 for them. `worker` and `notify`
# wait for a broker (service/process.py retries it); `kafka`, `demo`, `bench` and `litellm` run their own.
TALKS_TO_KAFKA = frozenset({"topics", "policy", "audit", "ledger", "report", "status", "view"})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="budgetflow")
@click.pass_context
def cli(click_ctx: click.Context) -> None:
    """budgetflow: exact monthly LLM inference budgets on Apache Kafka.

    Every option can also be set by the environment variable shown beside it;
    `budgetflow settings` lists every setting.
    """
    click_ctx.ensure_object(Context).needs_kafka = click_ctx.invoked_subcommand in TALKS_TO_KAFKA


for _command in (
    settings_cmd,
    schema,
    worker,
    notify,
    topics,
    policy,
    audit,
    ledger,
    report,
    status_cmd,
    view,
    simulate,
    demo,
    bench,
    kafka,
    litellm,
):
    cli.add_command(_command)


def main() -> None:
    """Entry point: our errors become one line on stderr and exit code 2; no broker, exit code 1."""
    try:
        cli.main(standalone_mode=False)
    except BrokerUnreachable as exc:
        click.echo(f"budgetflow: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BudgetflowError as exc:
        click.echo(f"budgetflow: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:
        _lost_broker(exc)
        raise


def _lost_broker(exc: Exception) -> None:
    """A broker that answered the command's check and went away during it: the same one line, exit code 1."""
    from aiokafka.errors import KafkaConnectionError

    if isinstance(exc, KafkaConnectionError):
        settings = Context().settings()  # they were read once already, so they are valid
        click.echo(f"budgetflow: {unreachable_line(settings.kafka.bootstrap_servers, str(exc))}", err=True)
        sys.exit(1)
