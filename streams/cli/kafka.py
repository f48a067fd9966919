"""`budgetflow kafka` (the local broker) and `budgetflow topics` (the topics budgetflow uses)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import click

from budgetflow.streams.cli.context import Context, pass_ctx

__all__ = ["kafka", "topics"]


# -- kafka --------------------------------------------------------------------
@click.group()
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


def _local_kafka(ctx: Context, data_dir: Path | None, port: int | None = None, secure: Path | None = None) -> Any:
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
def kafka_start(ctx: Context, data_dir: Path | None, port: int | None, secure: Path | None) -> None:
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
def kafka_stop(ctx: Context, data_dir: Path | None) -> None:
    """Stop the broker with a controlled shutdown."""
    broker = _local_kafka(ctx, data_dir)
    click.echo("kafka stopped" if broker.stop() else "kafka was not running", err=True)


@kafka.command("status")
@_data_dir
@pass_ctx
def kafka_status(ctx: Context, data_dir: Path | None) -> None:
    """Print the broker's address if it runs; exit 1 if it does not."""
    broker = _local_kafka(ctx, data_dir)
    if broker.pid() is None:
        click.echo("kafka is not running", err=True)
        sys.exit(1)
    click.echo(broker.bootstrap())


@click.group()
def topics() -> None:
    """The Kafka topics budgetflow uses."""


@topics.command("create")
@pass_ctx
def topics_create(ctx: Context) -> None:
    """Create every topic with its configuration (and check existing ones)."""
    from budgetflow.streams.kafka.topics import Topics, ensure_topics_now

    settings = ctx.settings()
    specs = Topics.from_settings(settings)
    asyncio.run(ensure_topics_now(settings, specs))
    for spec in specs.all():
        click.echo(f"{spec.name}\t{spec.partitions}\t{spec.config.get('cleanup.policy', 'delete')}")
