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
    """A local Apache Kafka (KRaft) for development, tests and the demo: one broker, or a cluster (--brokers 3)."""


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


def _local_cluster(ctx: Context, data_dir: Path | None, size: int | None = None) -> Any:
    from budgetflow.streams.dev.localcluster import LocalCluster

    settings = ctx.settings()
    return LocalCluster(data_dir or settings.data_dir, settings.local_kafka, size=size)


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
@click.option(
    "--brokers",
    type=click.IntRange(1, 9),
    default=1,
    show_default=True,
    help="Nodes: more than one runs a cluster on free ports (each node a broker and a controller), its data "
    "beside the single broker's; print every node's address.",
)
@pass_ctx
def kafka_start(ctx: Context, data_dir: Path | None, port: int | None, secure: Path | None, brokers: int) -> None:
    """Start the broker (fetching it through Maven once), wait until ready, print its address.

    Harmless when it is already running: it prints the address again. A broker first started with --secure
    stays secure on later starts.
    """
    if brokers > 1:
        _start_cluster(ctx, data_dir, port, secure, brokers)
        return
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


def _start_cluster(ctx: Context, data_dir: Path | None, port: int | None, secure: Path | None, size: int) -> None:
    if port:
        raise click.UsageError("--port is for one broker: a cluster's nodes take free ports, kept across starts")
    if secure is not None:
        raise click.UsageError("--secure runs one broker; a secure cluster is not built yet")
    cluster = _local_cluster(ctx, data_dir, size)
    began = time.monotonic()
    was_running = all(pid is not None for pid in cluster.pids().values())
    address = cluster.start()
    if not was_running:
        pids = ", ".join(str(pid) for pid in cluster.pids().values())
        took = time.monotonic() - began
        click.echo(f"kafka cluster ready in {took:.1f} s (pids {pids}, data {cluster.home})", err=True)
        layout = cluster.layout()
        click.echo(
            f"for topics on it set BUDGETFLOW_TOPICS__REPLICATION_FACTOR={layout.replication_factor} "
            f"(min.insync.replicas is then {layout.min_insync_replicas})",
            err=True,
        )
    click.echo(address)


@kafka.command("stop")
@_data_dir
@pass_ctx
def kafka_stop(ctx: Context, data_dir: Path | None) -> None:
    """Stop the broker, and the cluster if one was started here, with a controlled shutdown."""
    broker = _local_kafka(ctx, data_dir)
    click.echo("kafka stopped" if broker.stop() else "kafka was not running", err=True)
    cluster = _local_cluster(ctx, data_dir)
    if cluster.exists():
        click.echo("kafka cluster stopped" if cluster.stop() else "kafka cluster was not running", err=True)


@kafka.command("status")
@_data_dir
@pass_ctx
def kafka_status(ctx: Context, data_dir: Path | None) -> None:
    """Print the broker's address if it runs (a cluster's every node, when only a cluster was started here); exit 1
    if it does not (if any node does not)."""
    broker = _local_kafka(ctx, data_dir)
    cluster = _local_cluster(ctx, data_dir)
    if broker.pid() is None and cluster.exists():
        _cluster_status(cluster)
        return
    if broker.pid() is None:
        click.echo("kafka is not running", err=True)
        sys.exit(1)
    click.echo(broker.bootstrap())


def _cluster_status(cluster: Any) -> None:
    pids = cluster.pids()
    layout = cluster.layout()
    for node_id, pid in pids.items():
        port = layout.ports[node_id - 1][0]
        click.echo(f"node {node_id}: 127.0.0.1:{port} " + (f"pid {pid}" if pid else "not running"), err=True)
    down = [node_id for node_id, pid in pids.items() if pid is None]
    if down:
        click.echo(f"kafka cluster: {len(pids) - len(down)} of {len(pids)} nodes running", err=True)
        sys.exit(1)
    click.echo(cluster.bootstrap())


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
