"""A real Apache Kafka for the integration tests, started once per session.

The broker is started with the project's own command (`budgetflow kafka start`)
in a temporary data dir on a free port, and stopped at the end; set
``BUDGETFLOW_TEST_BOOTSTRAP=host:port`` to use a broker that is already running.
Every test gets unique topic names and app ids, so tests never see each other.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from budgetflow.schemas.settings import KafkaSettings
from budgetflow.streams.kafka.clients import client_options

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


# -- the pipeline under test: real workers as processes ----------------------------------------------------------

TEST_PRICES = """
as_of: "2026-11-01"
models:
  - match: "test-small"
    provider: testco
    input_usd_per_mtok: "1.000001"
    output_usd_per_mtok: "2.5"
    max_output_tokens: 4096
    source: "integration tests"
  - match: "test-large"
    provider: testco
    input_usd_per_mtok: "3"
    cached_input_usd_per_mtok: "0.3"
    cache_write_input_usd_per_mtok: "3.75"
    output_usd_per_mtok: "15"
    reasoning_usd_per_mtok: "15"
    max_output_tokens: 8192
    source: "integration tests"
  - match: "test-local"
    provider: ollama
    backend: local
    input_usd_per_mtok: "0"
    output_usd_per_mtok: "0"
    source: "integration tests"
"""


class Worker:
    """One worker process, its log, and how it ended."""

    def __init__(self, role: str, proc: subprocess.Popen[bytes], log: Path, crash_at: str | None) -> None:
        self.role = role
        self.proc = proc
        self.log = log
        self.crash_at = crash_at

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Pipeline:
    """budgetflow's workers against the session broker, with topics and groups of their own."""

    def __init__(
        self,
        bootstrap: str,
        root: Path,
        *,
        clock_start: str,
        speed: float,
        partitions: int = 4,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.prefix = f"t{uuid.uuid4().hex[:8]}."
        prices = root / "prices.yaml"
        prices.write_text(TEST_PRICES)
        self.env_base = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
        self.env_base.update(
            {
                "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "BUDGETFLOW_KAFKA__SESSION_TIMEOUT_MS": "6000",
                "BUDGETFLOW_KAFKA__HEARTBEAT_INTERVAL_MS": "1500",
                "BUDGETFLOW_TOPICS__PREFIX": self.prefix,
                "BUDGETFLOW_TOPICS__PARTITIONS": str(partitions),
                "BUDGETFLOW_TESTING": "1",
                "BUDGETFLOW_CLOCK__START": clock_start,
                "BUDGETFLOW_CLOCK__ANCHOR": datetime.datetime.now(datetime.UTC).isoformat(),
                "BUDGETFLOW_CLOCK__SPEED": str(speed),
                "BUDGETFLOW_HEARTBEAT_S": "0.2",
                "BUDGETFLOW_STATUS__REFRESH_S": "1",
                "BUDGETFLOW_PRICING__FILE": str(prices),
                "BUDGETFLOW_LOG_LEVEL": "INFO",
                "BUDGETFLOW_WEB__PORT": "0",
                "BUDGETFLOW_METRICS__PORT": "0",
                # Scenarios publish hours of simulated traffic at once, ahead of the simulated clock.
                "BUDGETFLOW_MAX_CLOCK_SKEW_S": "86400",
                **(extra_env or {}),
            }
        )
        self.workers: list[Worker] = []
        self._count = 0

    def settings(self) -> Any:
        from budgetflow.schemas.settings import settings_from_env

        return settings_from_env(self.env_base)

    @property
    def topics(self) -> Any:
        from budgetflow.streams.kafka.topics import Topics

        return Topics.from_settings(self.settings())

    def start(self, role: str, *, crash_at: str | None = None, data: str | None = None) -> Worker:
        self._count += 1
        env = dict(self.env_base)
        env["BUDGETFLOW_DATA_DIR"] = str(self.root / (data or f"{role}-data"))
        if crash_at:
            env["BUDGETFLOW_TEST_CRASH_AT"] = crash_at
        log = self.root / f"{role}-{self._count}.log"
        from budgetflow.streams.service.launch import spawn_worker

        with log.open("wb") as out:
            proc = spawn_worker(role, env, out)
        worker = Worker(role, proc, log, crash_at)
        self.workers.append(worker)
        return worker

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(budgetflow_cmd(*args), env=self.env_base, capture_output=True, text=True, timeout=120)

    async def produce(self, records: list[tuple[str, bytes | None, bytes | None]]) -> None:
        from budgetflow.streams.kafka.clients import client_options

        producer = AIOKafkaProducer(**client_options(self.settings().kafka), enable_idempotence=True, linger_ms=5)
        await producer.start()
        try:
            for topic, key, value in records:
                await producer.send(topic, key=key, value=value)
        finally:
            await producer.stop()

    async def period_states(self) -> dict[tuple[str, str], Any]:
        from budgetflow.streams.ops.readback import read_period_states

        return await read_period_states(self.settings(), self.topics.state.name)

    async def dead_letters(self) -> list[tuple[dict[str, bytes], bytes | None, bytes | None]]:
        """Every DLQ record: (headers, key, value)."""
        from budgetflow.streams.kafka.clients import client_options

        consumer = AIOKafkaConsumer(
            self.topics.dlq.name,
            **client_options(self.settings().kafka),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        out = []
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=1500)
                if not batch:
                    return out
                for records in batch.values():
                    out.extend((dict(r.headers), r.key, r.value) for r in records)
        finally:
            await consumer.stop()

    async def records(self, topic: str) -> list[tuple[int, bytes | None, bytes | None, int]]:
        from budgetflow.streams.kafka.follow import read_topic

        return await read_topic(self.settings(), topic)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {w.role} ({w.crash_at}) ---\n{w.tail(60)}" for w in self.workers)


@pytest.fixture
def pipeline_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Pipeline]]:
    """Pipelines on the session broker, or on the ``bootstrap`` given (a test on a cluster of its own starts no
    session broker: it is asked for only when needed)."""
    made: list[Pipeline] = []

    def make(bootstrap: str | None = None, **kwargs: Any) -> Pipeline:
        root = tmp_path / f"pipeline-{len(made)}"
        root.mkdir()
        pipeline = Pipeline(bootstrap or request.getfixturevalue("kafka_bootstrap"), root, **kwargs)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()


# -- a scenario with an independently computed expectation -----------------------------------------------------

START = datetime.datetime(2026, 11, 30, 20, tzinfo=datetime.UTC)  # the month ends four simulated hours in
SPEED = 3600.0  # one simulated hour per second
# Per-token rates of TEST_PRICES, in pico-dollars, written out again here: the expectation does not use
# budgetflow's pricing code.
RATES = {
    "test-small": {"in": 1_000_001, "cached": 1_000_001, "write": 1_000_001, "out": 2_500_000, "reason": 2_500_000},
    "test-large": {"in": 3_000_000, "cached": 300_000, "write": 3_750_000, "out": 15_000_000, "reason": 15_000_000},
    "test-local": {"in": 0, "cached": 0, "write": 0, "out": 0, "reason": 0},
}
MAX_OUTPUT = {"test-small": 4096, "test-large": 8192, "test-local": 10**9}
POLICIES = """
budgets:
  - id: global
    monthly_limit_usd: "5.00"
    hard_limit_action: block_cloud
  - id: "team:a"
    monthly_limit_usd: "0.50"
    soft_limit_percent: 50
    hard_limit_action: block_cloud
  - id: "team:b"
    monthly_limit_usd: "2.00"
  - id: "key:k1"
    monthly_limit_usd: "0.20"
    hard_limit_action: block_all
  - id: "nov:only"
    monthly_limit_usd: "0.01"
"""
LIMITS = {"global": 5 * 10**12, "team:a": 5 * 10**11, "team:b": 2 * 10**12, "key:k1": 2 * 10**11, "nov:only": 10**10}
SOFT = {"team:a": 50}


@dataclass
class Scenario:
    records: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    settled: dict[tuple[str, str], int] = field(default_factory=dict)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    settles: dict[tuple[str, str], int] = field(default_factory=dict)


def expected_of(events: list[tuple[str, dict[str, Any]]]) -> Scenario:
    """The exact sums the pipeline must reach, computed from the events alone.

    Per (budget, request, attempt): the first usage's cost by the rates above,
    else (no usage: the reservation expires) its estimate: the byte heuristic
    on ``input_bytes`` at the input rate plus ``max_tokens`` at the output rate.
    """
    scenario = Scenario()
    requests: dict[tuple[str, int], dict[str, Any]] = {}
    usages: dict[tuple[str, int], dict[str, Any]] = {}
    for kind, event in events:
        key = (event["request_id"], event.get("attempt", 0))
        (requests if kind == "requests" else usages).setdefault(key, event)
    for key in requests.keys() | usages.keys():
        if key in usages:
            u = usages[key]
            r = RATES[u["model"]]
            amount = (
                (u["input_tokens"] - u["cached_input_tokens"] - u["cache_write_input_tokens"]) * r["in"]
                + u["cached_input_tokens"] * r["cached"]
                + u["cache_write_input_tokens"] * r["write"]
                + (u["output_tokens"] - u["reasoning_tokens"]) * r["out"]
                + u["reasoning_tokens"] * r["reason"]
            )
            at, budgets = u["request_occurred_at"], u["budgets"]
        else:
            q = requests[key]
            r = RATES[q["model"]]
            heuristic = (23 * q["input_bytes"] + 79) // 80
            amount = heuristic * r["in"] + min(q["max_tokens"], MAX_OUTPUT[q["model"]]) * r["out"]
            at, budgets = q["occurred_at"], q["budgets"]
        period = at[:7]
        for budget in dict.fromkeys([*budgets, "global"]):
            k = (budget, period)
            scenario.settled[k] = scenario.settled.get(k, 0) + amount
            scenario.requests[k] = scenario.requests.get(k, 0) + 1
            if key in usages:
                scenario.settles[k] = scenario.settles.get(k, 0) + 1
    return scenario


def build_scenario(topics: Any, n: int = 1200, seed: int = 7) -> Scenario:
    """Eight simulated hours across the month boundary (see traffic)."""
    from traffic import Model, generate

    models = [
        Model("test-small", "testco"),
        Model("test-large", "testco", weight=2, caches=True, reasons=True),
        Model("test-local", "ollama", backend="local"),
    ]
    records = generate(
        n,
        seed=seed,
        start=START,
        span=datetime.timedelta(hours=8),
        models=models,
        budgets=["team:a", "team:b", "key:k1"],
        special={50: ["nov:only"]},
    )
    # nov:only only gets November traffic: its December requests go to no team.
    events = []
    for record in records:
        event = record.event
        at = event.get("request_occurred_at") or event["occurred_at"]
        if "nov:only" in event["budgets"] and not at.startswith("2026-11"):
            event = {**event, "budgets": []}
        events.append((record.kind, event))
    scenario = expected_of(events)
    names = {"requests": topics.requests.name, "usage": topics.usage.name}
    scenario.records = [(names[kind], e["request_id"].encode(), orjson.dumps(e)) for kind, e in events]
    return scenario


async def settle(pipeline: Pipeline, scenario: Scenario, timeout_s: float = 240) -> dict[tuple[str, str], Any]:
    """Wait until the aggregate's state holds exactly the expected sums (or fail showing the difference)."""
    deadline = time.monotonic() + timeout_s
    states: dict[tuple[str, str], Any] = {}
    while time.monotonic() < deadline:
        # A sharded budget's shards (budget#k) are summed in its own record: that is what must be exact.
        states = {k: s for k, s in (await pipeline.period_states()).items() if "#" not in k[0]}
        got = {k: s.settled for k, s in states.items()}
        reserved = {k: s.reserved for k, s in states.items() if s.reserved}
        if got == scenario.settled and not reserved:
            return states
        await asyncio.sleep(1.0)
    diff = {
        k: (states[k].settled if k in states else None, v)
        for k, v in scenario.settled.items()
        if k not in states or states[k].settled != v
    }
    extra = {k: (s.settled, s.reserved) for k, s in states.items() if k not in scenario.settled or s.reserved}
    raise AssertionError(f"state never matched: (got, expected) {diff}; extra {extra}\n{pipeline.logs()}")


def check_counts(states: dict[tuple[str, str], Any], scenario: Scenario) -> None:
    assert {k: s.requests for k, s in states.items()} == scenario.requests
    assert {k: s.settles for k, s in states.items() if s.settles} == scenario.settles


async def start_pipeline(
    factory: Callable[..., Pipeline],
    *,
    start: datetime.datetime = START,
    n: int = 1200,
    speed: float = SPEED,
    policies: str = POLICIES,
    **kwargs: Any,
) -> tuple[Pipeline, Scenario]:
    """Topics created, policies applied (through the CLI), a scenario built; no worker started yet."""
    pipeline = factory(clock_start=start.isoformat(), speed=speed, **kwargs)
    proc = pipeline.cli("topics", "create")
    assert proc.returncode == 0, proc.stderr
    policy = pipeline.root / "policies.yaml"
    policy.write_text(policies)
    proc = pipeline.cli("policy", "apply", str(policy))
    assert proc.returncode == 0, proc.stderr
    return pipeline, build_scenario(pipeline.topics, n=n)


@pytest.fixture
def kit() -> Any:
    """The scenario helpers, for test modules (which cannot import each other here)."""
    import types

    return types.SimpleNamespace(
        START=START,
        SPEED=SPEED,
        POLICIES=POLICIES,
        LIMITS=LIMITS,
        SOFT=SOFT,
        Scenario=Scenario,
        TEST_PRICES=TEST_PRICES,
        build=build_scenario,
        expected_of=expected_of,
        settle=settle,
        check_counts=check_counts,
        start=start_pipeline,
    )
