"""The pipeline `budgetflow demo` runs and the traffic it drives through it.

`Demo` starts what is missing (the local broker), the enrich and aggregate workers and the example gateway,
all on one simulated clock that runs a month in ``--duration`` seconds; it sends the planned requests to the
gateway over HTTP, counts what each cost on its own (`Tally`), and reads the pipeline's books back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from budgetflow.schemas.periods import month_start, next_month_start, period_of
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import Settings, settings_from_env
from budgetflow.streams.dev.demo_plan import (
    BUDGETS,
    DEMO_KEY,
    TEAM_KEYS,
    DemoConfig,
    Planned,
    Tally,
    expected_spend,
    gateway_keys,
    local_outage,
    plan,
    policies,
)
from budgetflow.streams.dev.localhost import free_port
from budgetflow.streams.service.launch import WorkerProcess

__all__ = ["Demo"]

# The repository's root: the demo starts its examples/gateway.py.
ROOT = Path(__file__).resolve().parents[2]


class Demo:
    def __init__(self, settings: Settings, config: DemoConfig) -> None:
        self.settings = settings
        self.config = config
        self.root = Path(settings.data_dir) / "demo"
        self.prefix = f"demo{datetime.now(UTC).strftime('%m%d%H%M%S')}."
        now = datetime.now(UTC)
        self.period = period_of(now)
        self.start = month_start(self.period)
        self.next_period = period_of(next_month_start(self.period))
        seconds = (next_month_start(self.period) - self.start).total_seconds()
        self.speed = seconds / config.duration_s
        self.anchor = now + timedelta(seconds=12)  # the simulated month starts once everything is up
        self.processes: list[WorkerProcess] = []
        self.planned: list[Planned] = []
        self.broker: Any = None
        self.tallies = {b: Tally() for b in BUDGETS}
        self.sent = 0
        self.dead_letters = 0
        self.malformed = 0
        self.web_port = free_port()
        self.gateway_port = free_port()
        self.metrics_port = free_port()

    # -- the simulated clock ------------------------------------------------------------
    def sim_now(self) -> datetime:
        elapsed = (datetime.now(UTC) - self.anchor).total_seconds()
        return self.start + timedelta(seconds=elapsed * self.speed)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS": self.settings.kafka.bootstrap_servers,
                "BUDGETFLOW_TESTING": "1",
                "BUDGETFLOW_CLOCK__START": self.start.isoformat(),
                "BUDGETFLOW_CLOCK__ANCHOR": self.anchor.isoformat(),
                "BUDGETFLOW_CLOCK__SPEED": repr(self.speed),
                "BUDGETFLOW_TOPICS__PREFIX": self.prefix,
                "BUDGETFLOW_DATA_DIR": str(self.root / self.prefix.rstrip(".")),
                "BUDGETFLOW_HEARTBEAT_S": "0.2",
                "BUDGETFLOW_STATUS__REFRESH_S": "0.5",
                "BUDGETFLOW_WEB__PORT": str(self.web_port),
                "BUDGETFLOW_METRICS__PORT": str(self.metrics_port),
                "BUDGETFLOW_LOG_LEVEL": "WARNING",
                # At 100,000x a day of simulated time is a second of processing lag: the dedupe horizon gets
                # ten wall-clock seconds' worth (the month's grace and every other rule stay as they are).
                "BUDGETFLOW_DEDUPE_HORIZON_S": str(max(86_400, int(10 * self.speed))),
                # Routers judge staleness on the simulated clock: give them wall-clock seconds' worth of it.
                "BUDGETFLOW_VIEW__STALE_AFTER_S": repr(3 * self.speed),
                "BUDGETFLOW_VIEW__EXPIRE_AFTER_S": repr(30 * self.speed),
                "BUDGETFLOW_VIEW__ADMIT_MAX_AGE_S": repr(1 * self.speed),
                # A lease lives at most an hour of simulated time, milliseconds here: the demo's routers admit
                # by the status rule (its budgets block at their caps all the same).
                "BUDGETFLOW_VIEW__LEASES": "false",
            }
        )
        return env

    def child_settings(self) -> Settings:
        return settings_from_env(self.env())

    # -- starting and stopping --------------------------------------------------------------
    async def ensure_broker(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        from budgetflow.streams.kafka.clients import client_options

        admin = AIOKafkaAdminClient(**{**client_options(self.settings.kafka), "request_timeout_ms": 3000})
        try:
            await asyncio.wait_for(admin.start(), 5)
            await admin.close()
            return
        except Exception:  # noqa: BLE001  # no broker answers: start the local one
            with contextlib.suppress(Exception):
                await admin.close()
        from budgetflow.streams.dev.localkafka import LocalKafka

        self.broker = LocalKafka(self.settings.data_dir, self.settings.local_kafka)
        address = await asyncio.to_thread(self.broker.start)
        self.settings = self.settings.model_copy(
            update={"kafka": self.settings.kafka.model_copy(update={"bootstrap_servers": address})}
        )

    async def start_pipeline(self) -> None:
        from budgetflow.streams.kafka.topics import Topics, ensure_topics_now
        from budgetflow.streams.ops.policy_admin import apply_policy_file
        from budgetflow.tokenizers import PriceTable

        settings = self.child_settings()
        topics = Topics.from_settings(settings)
        await ensure_topics_now(settings, topics)
        shutil.rmtree(self.root, ignore_errors=True)  # what earlier runs left behind
        self.root.mkdir(parents=True, exist_ok=True)
        self.planned = plan(self.config, self.start)
        policy = self.root / f"{self.prefix}policies.yaml"
        policy.write_text(policies(expected_spend(self.planned, PriceTable.from_settings(self.settings.pricing))))
        await apply_policy_file(settings, topics.policies.name, policy, prune=False)
        logs = self.root / "logs"
        env = self.env()
        self.processes = [
            WorkerProcess(role, env, logs / f"{self.prefix}{role}.log") for role in ("enrich", "aggregate")
        ]
        gateway = _gateway_script()
        keys = self.root / f"{self.prefix}keys.yaml"
        down = self.local_down
        down.unlink(missing_ok=True)
        keys.write_text(gateway_keys())
        self.processes.append(
            _Script(
                "gateway",
                [str(gateway), "--port", str(self.gateway_port), "--keys", str(keys), "--local-down-file", str(down)],
                env,
                logs / f"{self.prefix}gateway.log",
            )
        )

    async def wait_ready(self, http: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 90
        for url in (f"http://127.0.0.1:{self.web_port}/healthz", f"http://127.0.0.1:{self.gateway_port}/healthz"):
            while True:
                dead = [p.role for p in self.processes if not p.alive]
                if dead:
                    raise RuntimeError(f"the {dead[0]} process exited; see {self.root / 'logs'}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url) as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} did not become ready in 90 s")
                await asyncio.sleep(0.3)

    def stop(self, *, delete_topics: bool = True) -> None:
        for process in reversed(self.processes):
            process.stop()
        if delete_topics and self.processes:
            with contextlib.suppress(Exception):
                asyncio.run(self._delete_topics())
        if self.broker is not None:
            self.broker.stop()

    async def _delete_topics(self) -> None:
        """A second run starts clean: this run's topics go (every run has a prefix of its own)."""
        from aiokafka.admin import AIOKafkaAdminClient

        from budgetflow.streams.kafka.clients import client_options
        from budgetflow.streams.kafka.topics import Topics

        settings = self.child_settings()
        admin = AIOKafkaAdminClient(**client_options(settings.kafka))
        await admin.start()
        try:
            await admin.delete_topics([t.name for t in Topics.from_settings(settings).all()])
        finally:
            await admin.close()

    # -- traffic --------------------------------------------------------------------------------
    async def drive(self, http: aiohttp.ClientSession, planned: list[Planned]) -> None:
        from budgetflow.tokenizers import PriceTable

        table = PriceTable.from_settings(self.settings.pricing)
        queue: asyncio.Queue[Planned | None] = asyncio.Queue(maxsize=self.config.concurrency * 4)

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                await self._send(http, table, item)

        workers = [asyncio.create_task(worker()) for _ in range(self.config.concurrency)]
        malformed_at = {len(planned) // 3, len(planned) // 2, 2 * len(planned) // 3}
        outage = local_outage(self.start)
        for index, item in enumerate(planned):
            delay = (item.at - self.sim_now()).total_seconds() / self.speed
            if delay > 0:
                await asyncio.sleep(delay)
            self._local_model_up(not outage[0] <= item.at < outage[1])
            await queue.put(item)
            if index in malformed_at:
                await self._malformed()
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
        self._local_model_up(True)

    @property
    def local_down(self) -> Path:
        """While this file exists, the example gateway's local model fails."""
        return self.root / f"{self.prefix}local-down"

    def _local_model_up(self, up: bool) -> None:
        if up:
            self.local_down.unlink(missing_ok=True)
        else:
            self.local_down.touch()

    async def _send(self, http: aiohttp.ClientSession, table: Any, item: Planned) -> None:
        """One request through the gateway, counted on the demo's own books."""
        words = "explain the quarterly numbers and list the risks " * (item.size // 50 + 1)
        body = {
            "model": item.model,
            "max_tokens": item.max_tokens,
            "messages": [
                {"role": "system", "content": "You are concise."},
                {"role": "user", "content": words[: item.size]},
            ],
        }
        if item.key:  # the mobile app's key, narrowed to this request's team (or to none)
            headers = {"Authorization": f"Bearer {DEMO_KEY}", "X-Budget-Ids": item.team or ""}
        else:
            headers = {"Authorization": f"Bearer {TEAM_KEYS[item.team]}"}
        if item.insist_on_cloud:
            headers["X-Local-Fallback"] = "no"
        self.sent += 1
        async with http.post(
            f"http://127.0.0.1:{self.gateway_port}/v1/chat/completions", json=body, headers=headers
        ) as response:
            payload = await response.json()
            if response.status in (429, 502):  # refused by a budget; or no model left (local down, cloud blocked)
                for b in item.budgets:
                    if response.status == 429:
                        self.tallies[b].rejected += 1
                    else:
                        self.tallies[b].unserved += 1
                return
            response.raise_for_status()
            if response.headers.get("X-Budgetflow-Fallback") == "true":
                for b in item.budgets:
                    self.tallies[b].fallbacks += 1
            backend = response.headers["X-Budgetflow-Backend"]
            model = response.headers["X-Budgetflow-Model"]
            period = response.headers["X-Budgetflow-Period"]  # the month the gateway stamped on the request
        self._count(table, item, backend, model, period, payload["usage"])

    def _count(self, table: Any, item: Planned, backend: str, model: str, period: str, usage: Any) -> None:
        """What a served request cost, and on local what it would have cost on the cloud model asked for."""
        provider = "ollama" if backend == "local" else ("anthropic" if model.startswith("claude") else "openai")
        cost = table.cost(
            model,
            input_tokens=usage["prompt_tokens"],
            output_tokens=usage["completion_tokens"],
            backend=backend,
            provider=provider,
        ).pico_usd
        saved = 0
        if backend == "local":
            wanted = "anthropic" if item.model.startswith("claude") else "openai"
            saved = table.cost(
                item.model,
                input_tokens=usage["prompt_tokens"],
                output_tokens=usage["completion_tokens"],
                provider=wanted,
            ).pico_usd
        for b in item.budgets:
            tally = self.tallies[b]
            if backend == "local":
                tally.local += 1
                tally.saved_pico += saved
            else:
                tally.cloud += 1
            tally.cost_pico[period] = tally.cost_pico.get(period, 0) + cost

    async def _malformed(self) -> None:
        """A gateway bug: events that are not events. They go to the DLQ; the pipeline goes on."""
        from aiokafka import AIOKafkaProducer

        from budgetflow.streams.kafka.clients import client_options

        settings = self.child_settings()
        producer = AIOKafkaProducer(**client_options(settings.kafka))
        await producer.start()
        try:
            requests = f"{self.prefix}requests"
            await producer.send_and_wait(requests, key=b"bug", value=b'{"v": 1, "request_id": "bug", "model":')
            await producer.send_and_wait(requests, key=b"bug", value=dumps({"v": 2, "request_id": "future"}))
            self.malformed += 2
        finally:
            await producer.stop()

    # -- reading the pipeline back --------------------------------------------------------------
    async def stats(self, http: aiohttp.ClientSession, budget: str) -> dict[str, Any]:
        async with http.get(f"http://127.0.0.1:{self.web_port}/v1/budgets/{budget}") as response:
            return dict(await response.json()) if response.status == 200 else {}

    async def count_dead_letters(self) -> int:
        from budgetflow.streams.kafka.follow import read_topic

        return len(await read_topic(self.child_settings(), f"{self.prefix}dlq"))


def _gateway_script() -> Path:
    here = ROOT / "examples" / "gateway.py"
    if not here.exists():
        raise RuntimeError("the demo runs from a checkout of budgetflow (it starts examples/gateway.py)")
    return here


class _Script(WorkerProcess):
    """A Python script run like a worker (the example gateway)."""

    def __init__(self, role: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.role = role
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, *argv], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
