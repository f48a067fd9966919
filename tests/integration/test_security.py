"""The secure broker: SASL/SCRAM over TLS, the StandardAuthorizer, and one principal per role.

A broker of its own, started with `budgetflow kafka start --secure`. Everything budgetflow runs (workers, CLI,
publisher, view) connects with TLS and SCRAM from its settings; anyone else is refused; each principal can do
what its role needs and nothing more.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from budgetflow.schemas.settings import KafkaSettings, SecuritySettings
from budgetflow.streams.kafka.clients import client_options

pytestmark = pytest.mark.timeout(400)

PREFIX = "sec."
TOKEN = "stats-token-4f9d2c"  # a test's own token


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line)


def descendants(root: int) -> set[int]:
    """A process and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


class CommandLines(threading.Thread):
    """Records what `ps` shows of every process below one (their command lines) while it runs."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.seen: set[str] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid in descendants(self.root):
                try:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if raw:
                    self.seen.add(raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace"))
            self.done.wait(0.005)


@pytest.fixture(scope="module")
def start_command_lines() -> list[str]:
    """The command line of every process `kafka start --secure` ran (filled in by `secure_broker`)."""
    return []


@pytest.fixture(scope="module")
def secure_broker(
    tmp_path_factory: pytest.TempPathFactory, budgetflow_cli: Callable[..., list[str]], start_command_lines: list[str]
) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("secure")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env["BUDGETFLOW_TOPICS__PREFIX"] = PREFIX
    data, certs = root / "data", root / "certs"
    proc = subprocess.Popen(
        budgetflow_cli("kafka", "start", "--data-dir", str(data), "--port", "0", "--secure", str(certs)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watcher = CommandLines(proc.pid)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        watcher.done.set()
        watcher.join()
    start_command_lines.extend(sorted(watcher.seen))
    assert proc.returncode == 0, stderr
    try:
        yield stdout.strip(), certs
    finally:
        subprocess.run(budgetflow_cli("kafka", "stop", "--data-dir", str(data)), env=env, check=False, timeout=120)


def kafka_settings(bootstrap: str, **security: Any) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap, request_timeout_ms=5000, security=SecuritySettings(**security))


def role_settings(certs: Path, role: str) -> KafkaSettings:
    values = env_file(certs / f"{role}.env")
    prefix = "BUDGETFLOW_KAFKA__SECURITY__"
    security = {k.removeprefix(prefix).lower(): v for k, v in values.items() if k.startswith(prefix)}
    return kafka_settings(values["BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS"], **security)


async def can_connect(kafka: KafkaSettings) -> bool:
    admin = AIOKafkaAdminClient(**client_options(kafka))
    try:
        await asyncio.wait_for(admin.start(), 20)
        await asyncio.wait_for(admin.describe_cluster(), 20)
        return True
    except (KafkaError, TimeoutError, OSError):
        return False
    finally:
        await admin.close()


async def can_write(kafka: KafkaSettings, topic: str) -> bool:
    producer = AIOKafkaProducer(**client_options(kafka), enable_idempotence=True)
    try:
        await producer.start()  # an idempotent producer needs a Write grant somewhere to start at all
        await asyncio.wait_for(producer.send_and_wait(topic, b"{}", key=b"probe"), 20)
        return True
    except KafkaError:
        return False
    finally:
        await producer.stop()


async def can_read(kafka: KafkaSettings, topic: str) -> bool:
    """Whether records come back from a topic that has some (aiokafka logs a refused fetch and returns none)."""
    consumer = AIOKafkaConsumer(**client_options(kafka), enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            batch = await asyncio.wait_for(consumer.getmany(tp, timeout_ms=1000), 20)
            if batch.get(tp):
                return True
        return False
    except KafkaError:
        return False
    finally:
        await consumer.stop()


async def test_a_client_without_valid_credentials_is_refused(secure_broker: tuple[str, Path]) -> None:
    bootstrap, certs = secure_broker
    router = role_settings(certs, "router")
    password = router.security.sasl_password
    assert password is not None
    assert await can_connect(router), "the control: the router's own credentials work"
    # No TLS, no SASL; TLS but no SASL; the right user with a wrong password; the right password over
    # plaintext SASL (the listener speaks only TLS).
    assert not await can_connect(kafka_settings(bootstrap))
    assert not await can_connect(kafka_settings(bootstrap, protocol="SSL", ssl_cafile=certs / "ca.pem"))
    assert not await can_connect(
        kafka_settings(
            bootstrap,
            protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="router",
            sasl_password="not-the-password",
            ssl_cafile=certs / "ca.pem",
        )
    )
    assert not await can_connect(
        kafka_settings(
            bootstrap,
            protocol="SASL_PLAINTEXT",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="router",
            sasl_password=password.get_secret_value(),
        )
    )
    # A broker certificate signed by someone else is refused by the client: the default trust store does not
    # know our CA.
    assert not await can_connect(
        kafka_settings(
            bootstrap,
            protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="router",
            sasl_password=password.get_secret_value(),
        )
    )


async def test_the_pipeline_runs_over_tls_and_scram_and_each_role_does_only_its_part(
    secure_broker: tuple[str, Path], pipeline_factory: Any, tmp_path: Path
) -> None:
    from budgetflow.streams import BudgetPublisher, BudgetView, Usage

    bootstrap, certs = secure_broker
    now = datetime.now(UTC)
    pipeline = pipeline_factory(
        bootstrap=bootstrap,
        clock_start=now.isoformat(),
        speed=1.0,
        extra_env={
            **env_file(certs / "worker.env"),
            "BUDGETFLOW_TOPICS__PREFIX": PREFIX,
            "BUDGETFLOW_WEB__BEARER_TOKEN": TOKEN,
        },
    )
    proc = pipeline.cli("topics", "create")
    assert proc.returncode == 0, proc.stderr
    policies = tmp_path / "policies.yaml"
    policies.write_text('budgets:\n  - id: "team:a"\n    monthly_limit_usd: "10.00"\n')
    proc = pipeline.cli("policy", "apply", str(policies))
    assert proc.returncode == 0, proc.stderr
    enrich, aggregate = pipeline.start("enrich"), pipeline.start("aggregate")
    topics = pipeline.topics

    # The gateway publishes with its own principal; the router follows statuses with its own.
    gateway_settings = pipeline.settings().model_copy(update={"kafka": role_settings(certs, "gateway")})
    router_settings = pipeline.settings().model_copy(update={"kafka": role_settings(certs, "router")})
    expected = 0
    async with BudgetPublisher(gateway_settings, spool_dir=tmp_path / "spool") as publisher:
        for i in range(50):
            handle = await publisher.publish_request(
                request_id=f"s-{i}",
                model="test-small",
                provider="testco",
                backend="cloud",
                budgets=["team:a"],
                messages=[{"role": "user", "content": f"secret prompt {i}"}],
                max_tokens=100,
                occurred_at=now,
            )
            await publisher.publish_usage(handle, Usage(input_tokens=100 + i, output_tokens=20))
            expected += (100 + i) * 1_000_001 + 20 * 2_500_000  # TEST_PRICES for test-small, per token
        await publisher.flush()
        assert publisher.counts.get("usage_spooled", 0) == 0
    view = BudgetView(router_settings)
    await view.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and view.status("team:a").spend_pico != expected:
            await asyncio.sleep(0.5)
        assert view.status("team:a").spend_pico == expected, pipeline.logs()
    finally:
        await view.stop()
    states = await pipeline.period_states()
    assert states[("team:a", now.strftime("%Y-%m"))].settled == expected
    assert enrich.alive
    assert aggregate.alive

    router, gateway = role_settings(certs, "router"), role_settings(certs, "gateway")
    # Every topic probed for reading below has records on partition 0 (the controls show the worker reads them).
    worker = role_settings(certs, "worker")
    for topic in (topics.status.name, topics.ledger.name, topics.requests.name):
        assert await can_read(worker, topic), topic
    # The router reads statuses, and cannot write policies, ledger entries, statuses or usage.
    assert await can_read(router, topics.status.name)
    for topic in (topics.policies.name, topics.ledger.name, topics.status.name, topics.usage.name):
        assert not await can_write(router, topic), topic
    assert not await can_read(router, topics.ledger.name)
    # It asks for leases on their own topic (enrich makes them ledger entries): the ledger stays the workers'.
    assert await can_write(router, topics.lease_asks.name)
    # The gateway writes requests and usage, and nothing else; it reads nothing.
    assert await can_write(gateway, topics.usage.name)
    assert await can_write(gateway, topics.requests.name)
    for topic in (topics.policies.name, topics.ledger.name, topics.status.name, topics.state.name):
        assert not await can_write(gateway, topic), topic
    for topic in (topics.status.name, topics.requests.name):
        assert not await can_read(gateway, topic), topic

    # The stats API asks for the bearer token; health and metrics stay open for probes and Prometheus.
    from budgetflow.streams.ops.readback import read_heartbeats

    beats = await read_heartbeats(pipeline.settings(), topics.heartbeats.name)
    url = next(b.owner for b in beats.values() if b.owner)
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            async with http.get(f"{url}/v1/budgets/team:a", headers=headers) as response:
                assert response.status == 401, headers
                assert "team:a" not in await response.text()
        async with http.get(f"{url}/v1/budgets/team:a", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200
            assert (await response.json())["budget_id"] == "team:a"
        for path in ("/healthz", "/metrics"):
            async with http.get(f"{url}{path}") as response:
                assert response.status == 200, path

    # The probes above went to the DLQ as malformed records, and what the pipeline wrote carries no prompt.
    for topic in (topics.ledger.name, topics.status.name, topics.dlq.name):
        for _, _key, value, _ in await pipeline.records(topic):
            assert b"secret prompt" not in (value or b""), topic
    logs = "".join(w.log.read_text() for w in pipeline.workers)
    assert "secret prompt" not in logs
    assert TOKEN not in logs
    assert env_file(certs / "worker.env")["BUDGETFLOW_KAFKA__SECURITY__SASL_PASSWORD"] not in logs


def test_secrets_are_private_and_never_on_a_command_line(
    secure_broker: tuple[str, Path], start_command_lines: list[str]
) -> None:
    """The SCRAM passwords reach the storage tool, the broker and the ACL tool through files only (`ps` shows any
    user every command line); the secure dir is 0700 with its keys and secrets 0600; the data dir (the broker's
    own password in server.properties, prompt text in the requests topic's segments) is 0700 with 0600 files."""
    _, certs = secure_broker
    passwords = list(json.loads((certs / "credentials.json").read_text()).values())
    assert len(passwords) == 4
    # The watcher saw each Java process of the start: the storage tool, the broker, the ACL tool.
    for main in ("kafka.tools.StorageTool format", "kafka.Kafka ", "org.apache.kafka.tools.AclCommand"):
        assert any(main in line for line in start_command_lines), (main, len(start_command_lines))
    leaks = [line for line in start_command_lines if "password=" in line or any(p in line for p in passwords)]
    for password in passwords:
        leaks = [line.replace(password, "***") for line in leaks]  # the report shows where, not what
    if leaks:
        pytest.fail(f"passwords on a command line: {leaks}", pytrace=False)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.lstat().st_mode)

    assert mode(certs) == 0o700
    for name in (
        "credentials.json",
        "ca.key",
        "broker.key",
        "broker.pem",
        *(f"{r}.env" for r in ("admin", "worker", "router", "gateway")),
    ):
        assert mode(certs / name) == 0o600, name
    home = certs.parent / "data" / "kafka"
    config = (home / "server.properties").read_text()
    assert any(p in config for p in passwords), "the broker logs in with the admin password from its config"
    assert mode(home) == 0o700
    assert not (home / "format.args").exists(), "the storage tool's argument file is removed after the format"
    loose = []
    for dirpath, dirnames, filenames in os.walk(home):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            try:
                if not path.is_symlink() and mode(path) & 0o077:
                    loose.append(f"{oct(mode(path))} {path.relative_to(home)}")
            except FileNotFoundError:
                continue  # deleted meanwhile (the broker runs)
    assert loose == []
