"""`budgetflow litellm`: a LiteLLM proxy under budgetflow's budgets, with the pipeline it needs, until Ctrl-C.

It starts the local broker (unless ``BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS`` names one), creates the topics, applies
the example policies, starts the enrich and aggregate workers and then ``litellm --config
examples/litellm/config.yaml`` with budgetflow's settings in its environment, waits until the proxy answers,
prints how to try it, and on Ctrl-C stops what it started. The proxy process imports
``budgetflow.integrations.litellm`` (its config's callbacks line); this command never does (docs/litellm.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from budgetflow.schemas.settings import Settings
from budgetflow.streams.cli.context import (
    CONNECT_TIMEOUT_S,
    BrokerUnreachable,
    Context,
    pass_ctx,
    unreachable_line,
)

__all__ = ["litellm"]

ROOT = Path(__file__).resolve().parents[2]  # a checkout of budgetflow: its examples/litellm/
EXAMPLE = ROOT / "examples" / "litellm"
EXAMPLE_LOCAL_MODELS = '{"gpt-4o": "llama3.1"}'  # the example config's cloud group -> its local group
START_TIMEOUT_S = 180.0  # the proxy imports all of LiteLLM; on two busy cores that takes a while


@click.command("litellm")
@click.option("--port", type=click.IntRange(1, 65535), default=4000, help="Port of the LiteLLM proxy.")
@click.option("--host", default="127.0.0.1", help="Interface the proxy listens on.")
@click.option("--num-workers", type=click.IntRange(1, 64), default=1, help="Proxy worker processes.")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The proxy's config (default examples/litellm/config.yaml: mocked models, keys from keys.yaml).",
)
@click.option(
    "--policies",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Policy file applied before the start (default examples/litellm/policies.yaml).",
)
@click.option(
    "--kafka-port",
    type=click.IntRange(0, 65535),
    envvar="BUDGETFLOW_LOCAL_KAFKA__PORT",
    show_envvar=True,
    default=None,
    help="Port of the local broker if it is started here; 0 picks a free one (default: its last, else 9092).",
)
@pass_ctx
def litellm(
    ctx: Context,
    port: int,
    host: str,
    num_workers: int,
    config: Path | None,
    policies: Path | None,
    kafka_port: int | None,
) -> None:
    """Run a LiteLLM proxy under budgetflow's budgets, with the broker and workers it needs, until Ctrl-C.

    Starts the local broker (in BUDGETFLOW_DATA_DIR) unless BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS names one, creates
    the topics, applies the policies, starts the enrich and aggregate workers and `litellm --config ...` with
    budgetflow's settings in its environment, and prints how to try it. Ctrl-C stops what it started.
    """
    from budgetflow.streams.dev.litellm_proxy import NOT_INSTALLED, installed

    if not installed():
        click.echo(f"budgetflow: {NOT_INSTALLED}", err=True)
        sys.exit(1)
    config = (config or EXAMPLE / "config.yaml").resolve()
    policies = (policies or EXAMPLE / "policies.yaml").resolve()
    for path in (config, policies):
        if not path.is_file():
            raise click.UsageError(f"{path} is not there (the examples come with a checkout): pass --config/--policies")
    run = _Run(ctx.settings(), config, policies)
    sys.exit(run.main(port=port, host=host, workers=num_workers, kafka_port=kafka_port))


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


class _Run:
    """What one `budgetflow litellm` started, to stop it again, last started first."""

    def __init__(self, settings: Settings, config: Path, policies: Path) -> None:
        self.settings = settings
        self.config = config
        self.policies = policies
        self.data_dir = Path(settings.data_dir).resolve()
        self.logs = self.data_dir / "litellm" / "logs"
        self.broker: Any = None  # the LocalKafka this command started, if it did
        self.workers: list[Any] = []
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_log = self.logs / "proxy.log"
        self.web_port = self.metrics_port = 0
        self.local_models: dict[str, str] = {}

    def main(self, *, port: int, host: str, workers: int, kafka_port: int | None) -> int:
        """Start everything, wait for Ctrl-C (or SIGTERM, or a child's death), stop everything: the exit status."""
        previous = signal.signal(signal.SIGTERM, _interrupt)
        # Ctrl-C stops it also when started where SIGINT is ignored (a shell's `budgetflow litellm &`).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # a new topic's leader elections are not news
        code = 0
        try:
            address = self._broker(kafka_port)
            self._pipeline(address)
            self._start_proxy(address, port, host, workers)
            self._wait_ready(port, host)
            self._print_ready(address, port, host, workers)
            code = self._watch()
        except KeyboardInterrupt:
            click.echo("stopping", err=True)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the stop short
            self.stop()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
        return code

    # -- starting -----------------------------------------------------------------------------
    def _broker(self, kafka_port: int | None) -> str:
        """The bootstrap address: the broker the environment names (it must answer), else the local one."""
        if "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS" in os.environ:
            from budgetflow.streams.kafka.clients import unreachable

            servers = self.settings.kafka.bootstrap_servers
            reason = asyncio.run(unreachable(self.settings.kafka, CONNECT_TIMEOUT_S))
            if reason is not None:
                raise BrokerUnreachable(unreachable_line(servers, reason))
            return servers
        from budgetflow.schemas.errors import LocalKafkaError
        from budgetflow.streams.dev.localkafka import LocalKafka

        local = self.settings.local_kafka
        if kafka_port is not None:
            local = local.model_copy(update={"port": kafka_port})
        broker = LocalKafka(self.data_dir, local, topic_prefix=self.settings.topics.prefix)
        running = broker.pid() is not None
        if not running:
            click.echo(f"starting the local broker in {broker.home}", err=True)
        try:
            address: str = broker.start()
        except LocalKafkaError as exc:  # its own hint names `kafka start --port`; ours is --kafka-port
            raise LocalKafkaError(str(exc).replace("with --port", "with --kafka-port")) from exc
        if not running:
            self.broker = broker
        return address

    def _pipeline(self, address: str) -> None:
        """Topics, policies, then the enrich and aggregate workers (as `make run` has them)."""
        from budgetflow.streams.dev.localhost import free_port
        from budgetflow.streams.kafka.topics import Topics, ensure_topics_now
        from budgetflow.streams.ops.audit import default_actor
        from budgetflow.streams.ops.policy_admin import apply_policies, load_policy_file
        from budgetflow.streams.rules.clock import Clock
        from budgetflow.streams.service.launch import WorkerProcess

        self.settings = self.settings.model_copy(
            update={"kafka": self.settings.kafka.model_copy(update={"bootstrap_servers": address})}
        )
        specs = Topics.from_settings(self.settings)
        asyncio.run(ensure_topics_now(self.settings, specs))
        wanted = asyncio.run(load_policy_file(self.policies))
        plan = asyncio.run(
            apply_policies(
                self.settings,
                specs.policies.name,
                wanted,
                prune=False,
                audit_topic=specs.audit.name,
                actor=default_actor(),
                now=Clock(self.settings.clock).now(),
            )
        )
        click.echo(
            f"policies {_shown(self.policies)}: {len(plan.added)} added, {len(plan.changed)} changed, "
            f"{len(plan.unchanged)} unchanged",
            err=True,
        )
        # The stats API and enrich's /metrics on the ports the environment sets, else on free ones.
        self.web_port = _port_setting("BUDGETFLOW_WEB__PORT", self.settings.web.port) or free_port()
        self.metrics_port = _port_setting("BUDGETFLOW_METRICS__PORT", self.settings.metrics.port) or free_port()
        env = self._env(
            address,
            {"BUDGETFLOW_WEB__PORT": str(self.web_port), "BUDGETFLOW_METRICS__PORT": str(self.metrics_port)},
        )
        self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.workers = [WorkerProcess(role, env, self.logs / f"{role}.log") for role in ("enrich", "aggregate")]

    def _env(self, address: str, extra: Mapping[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS": address, "BUDGETFLOW_DATA_DIR": str(self.data_dir), **extra})
        return env

    def _start_proxy(self, address: str, port: int, host: str, workers: int) -> None:
        """`litellm --config ...` in a process group of its own (Ctrl-C reaches this command, which stops the
        proxy with SIGTERM first, so that its last usage is published), dying with this command."""
        from budgetflow.schemas.settings import settings_from_env
        from budgetflow.streams.dev.litellm_proxy import proxy_command, spawn_proxy
        from budgetflow.streams.dev.localhost import port_open

        if port_open(port):
            raise click.UsageError(f"port {port} is in use by another program: choose another with --port")
        extra = {"LITELLM_LOCAL_MODEL_COST_MAP": os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "True")}
        if "BUDGETFLOW_LITELLM__LOCAL_MODELS" not in os.environ and self.config == EXAMPLE / "config.yaml":
            extra["BUDGETFLOW_LITELLM__LOCAL_MODELS"] = EXAMPLE_LOCAL_MODELS
        env = self._env(address, extra)
        self.local_models = settings_from_env(env).litellm.local_models  # a bad setting: one line, before the start
        self.proxy = spawn_proxy(proxy_command(self.config, host, port, workers), env, self.proxy_log)

    def _children(self) -> list[tuple[str, bool, Path]]:
        """(name, whether it runs, its log) of every child process."""
        found = [(str(w.role), bool(w.alive), Path(w.log)) for w in self.workers]
        if self.proxy is not None:
            found.append(("LiteLLM proxy", self.proxy.poll() is None, self.proxy_log))
        return found

    def _check_alive(self) -> None:
        from budgetflow.streams.service.launch import log_tail

        for name, alive, log in self._children():
            if not alive:
                raise click.ClickException(f"the {name} exited; its log: {_shown(log)}\n{log_tail(log, 15)}")

    def _wait_ready(self, port: int, host: str) -> None:
        """Until the aggregate's /healthz and the proxy's /health/liveliness answer 200."""
        target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104  # listening on all
        urls = [f"http://127.0.0.1:{self.web_port}/healthz", f"http://{target}:{port}/health/liveliness"]
        deadline = time.monotonic() + START_TIMEOUT_S
        for url in urls:
            while not _answers(url):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise click.ClickException(f"{url} did not answer in {START_TIMEOUT_S:.0f} s; logs in {self.logs}")
                time.sleep(0.3)

    # -- running --------------------------------------------------------------------------------
    def _print_ready(self, address: str, port: int, host: str, workers: int) -> None:
        target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
        base = f"http://{target}:{port}"
        example = self.config == EXAMPLE / "config.yaml"
        key = "sk-demo" if example else "$YOUR_KEY"
        model = _first_model(self.config)
        shift = ", ".join(f"{c} -> {lo}" for c, lo in self.local_models.items()) or "none"
        status = "budgetflow" if shutil.which("budgetflow") else _shown(Path(sys.executable).with_name("budgetflow"))
        if address != "127.0.0.1:9092":
            status = f"BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS={address} {status}"
        body = f'{{"model": "{model}", "max_tokens": 20, "messages": [{{"role": "user", "content": "hi"}}]}}'
        keys = "sk-demo is team:search, sk-demo-support team:support (examples/litellm/keys.yaml); " if example else ""
        click.echo(
            f"""
budgetflow litellm: a LiteLLM proxy under budgetflow's budgets
  proxy      {base}  ({_shown(self.config)}, {workers} worker{"s" if workers > 1 else ""}; shift: {shift})
  broker     {address}  (topics {self.settings.topics.prefix}*)
  stats API  http://127.0.0.1:{self.web_port}/v1/budgets
  logs       {_shown(self.logs)}/

Try it ({keys}docs/litellm.md):
  curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
       -d '{body}' -D -

  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="{key}")
  raw = client.chat.completions.with_raw_response.create(
      model="{model}", max_tokens=20, messages=[{{"role": "user", "content": "hi"}}]
  )
  print(raw.headers["x-budget-cost-estimated"], raw.parse().choices[0].message.content)

  {status} status

Ctrl-C stops what this command started."""
        )

    def _watch(self) -> int:
        """Until Ctrl-C (KeyboardInterrupt) or a child's death (status 1)."""
        while True:
            try:
                self._check_alive()
            except click.ClickException as exc:
                click.echo(f"budgetflow: {exc.message}", err=True)
                return 1
            time.sleep(0.5)

    # -- stopping -------------------------------------------------------------------------------
    def stop(self) -> None:
        """The proxy first (it publishes its last usage), then the workers, then the broker if started here."""
        if self.proxy is not None:
            from budgetflow.streams.dev.litellm_proxy import stop_group

            stop_group(self.proxy)
        for worker in reversed(self.workers):
            worker.stop()
        if self.broker is not None:
            self.broker.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  # our own http:// URLs
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _port_setting(name: str, value: int) -> int:
    """The port a setting gives, when the environment sets it (0 there: any free one); else 0."""
    return value if name in os.environ else 0


def _first_model(config: Path) -> str:
    """The first model group of a proxy config, for the commands shown (gpt-4o when it names none)."""
    import yaml

    with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, IndexError, KeyError, TypeError):
        name = yaml.safe_load(config.read_text())["model_list"][0]["model_name"]
        if isinstance(name, str) and name:
            return name
    return "gpt-4o"


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is under it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)
