"""A real Apache Kafka for the integration tests, started once per session.

The broker is started with the project's own command (`budgetflow kafka start`)
in a temporary data dir on a free port, and stopped at the end; set
``BUDGETFLOW_TEST_BOOTSTRAP=host:port`` to use a broker that is already running.
Every test gets unique topic names and app ids, so tests never see each other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from budgetflow.schemas.settings import KafkaSettings
from budgetflow.streams.clients import client_options

pytestmark = pytest.mark.integration

# Short enough that a killed consumer's partitions move in seconds (the broker's
# group.min.session.timeout.ms is 3000).
CLIENT_SESSION_TIMEOUT_MS = 6000
CLIENT_HEARTBEAT_MS = 1500


def budgetflow_cmd(*args: str) -> list[str]:
    """The installed `budgetflow` console script next to this interpreter."""
    script = Path(sys.executable).with_name("budgetflow")
    return [str(script), *args]


@pytest.fixture(scope="session")
def budgetflow_cli() -> Callable[..., list[str]]:
    """Builds a command line for the installed `budgetflow` script."""
    return budgetflow_cmd


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("budgetflow-data")


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_data_dir: Path) -> Iterator[str]:
    existing = os.environ.get("BUDGETFLOW_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    proc = subprocess.run(
        budgetflow_cmd("kafka", "start", "--data-dir", str(kafka_data_dir), "--port", "0"),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"`budgetflow kafka start` failed: {proc.stderr.strip()}", pytrace=False)
    sys.stderr.write(proc.stderr)
    try:
        yield proc.stdout.strip()
    finally:
        subprocess.run(
            budgetflow_cmd("kafka", "stop", "--data-dir", str(kafka_data_dir)), env=env, check=False, timeout=60
        )
        shutil.rmtree(kafka_data_dir, ignore_errors=True)


def unique(hint: str) -> str:
    """A name no other test uses: `hint-<8 hex>`."""
    return f"{hint}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def app_id_factory() -> Callable[[str], str]:
    """Unique Faust app ids (consumer groups) per test."""
    return lambda hint="app": unique(f"bf-test-{hint}")


TopicFactory = Callable[..., Awaitable[str]]


@pytest.fixture(scope="session")
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    """Client settings for the test broker, as a worker would build them."""
    return KafkaSettings(bootstrap_servers=kafka_bootstrap, client_id="budgetflow-tests")


@pytest.fixture
async def admin(kafka_settings: KafkaSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(**client_options(kafka_settings))
    await client.start()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def topic_factory(admin: AIOKafkaAdminClient) -> AsyncIterator[TopicFactory]:
    """Creates uniquely named topics (deleted after the test)."""
    created: list[str] = []

    async def make(hint: str = "topic", *, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = unique(f"test.{hint}")
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config or {})])
        created.append(name)
        return name

    yield make
    if created:
        await admin.delete_topics(created)


@pytest.fixture
async def producer_factory(kafka_settings: KafkaSettings) -> AsyncIterator[Callable[..., Awaitable[AIOKafkaProducer]]]:
    producers: list[AIOKafkaProducer] = []

    async def make(**kwargs: Any) -> AIOKafkaProducer:
        kwargs.setdefault("enable_idempotence", True)
        producer = AIOKafkaProducer(**{**client_options(kafka_settings), **kwargs})
        await producer.start()
        producers.append(producer)
        return producer

    yield make
    for producer in producers:
        await producer.stop()


@pytest.fixture
async def consumer_factory(kafka_settings: KafkaSettings) -> AsyncIterator[Callable[..., Awaitable[AIOKafkaConsumer]]]:
    consumers: list[AIOKafkaConsumer] = []

    async def make(*topics: str, **kwargs: Any) -> AIOKafkaConsumer:
        kwargs.setdefault("auto_offset_reset", "earliest")
        kwargs.setdefault("enable_auto_commit", False)
        kwargs.setdefault("session_timeout_ms", CLIENT_SESSION_TIMEOUT_MS)
        kwargs.setdefault("heartbeat_interval_ms", CLIENT_HEARTBEAT_MS)
        consumer = AIOKafkaConsumer(*topics, **{**client_options(kafka_settings), **kwargs})
        await consumer.start()
        consumers.append(consumer)
        return consumer

    yield make
    for consumer in consumers:
        await consumer.stop()
