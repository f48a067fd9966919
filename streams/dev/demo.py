"""`budgetflow demo`: a month of LLM traffic through the real pipeline, watched live.

It starts what is missing (the local broker), the enrich and aggregate workers
and the example gateway, all on one simulated clock that runs a month in
``--duration`` seconds (every time rule holds in simulated time), applies a
sample policy set, and sends chat requests of varied sizes to several models
through the gateway over HTTP: a daily rhythm, a few malformed events, a
burst that pushes one team over its hard limit, and the month boundary.
The terminal shows each budget's spend against its limit as it happens; the
summary checks the pipeline's totals against the demo's own count, to the
pico-dollar, and says what the shift to local models saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from budgetflow.schemas.money import format_usd, parse_usd, usd_string
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import Settings, load_settings, settings_from_env
from budgetflow.streams.dev.localkafka import free_port
from budgetflow.streams.rules.clock import month_start, next_month_start
from budgetflow.streams.service.launch import WorkerProcess

__all__ = ["DemoConfig", "run_demo"]

DEMO_KEY = "sk-demo-mobile-app"
KEY_BUDGET = "key:" + hashlib.sha256(DEMO_KEY.encode()).hexdigest()[:8]
# Each team calls the gateway with a key of its own; the gateway charges a key's requests to its budgets.
TEAM_KEYS = {"team:search": "sk-demo-search", "team:support": "sk-demo-support", None: "sk-demo-batch"}
MODELS = [("gpt-4o", 5), ("gpt-4o-mini", 6), ("claude-sonnet-4-5", 3), ("gpt-4.1", 2)]
TEAMS = {"team:search": 0.5, "team:support": 0.35, None: 0.15}


def policies(expected: dict[str, int]) -> str:
    """Limits sized to the planned traffic, so that every kind of status change happens in the month."""

    def usd(pico: float) -> str:
        return format_usd(max(int(pico), 10**10), 2)

    return f"""budgets:
  - id: global
    monthly_limit_usd: "{usd(expected["global"] * 1.1)}"
    soft_limit_percent: 80
    hard_limit_action: block_cloud
    description: "company-wide"
  - id: "team:search"
    monthly_limit_usd: "{usd(expected["team:search"] * 0.8)}"
    soft_limit_percent: 75
    hard_limit_action: block_cloud
  - id: "team:support"
    monthly_limit_usd: "{usd(expected["team:support"] * 1.3)}"
    soft_limit_percent: 60
    hard_limit_action: warn
  - id: "{KEY_BUDGET}"
    monthly_limit_usd: "{usd(expected[KEY_BUDGET] * 0.6)}"
    hard_limit_action: block_all
    description: "the mobile app's API key"
"""


def gateway_keys() -> str:
    """The example gateway's key file: a key per team, and the mobile app's key, which may be charged to either
    team (each of its requests narrows that to one team, or none, with X-Budget-Ids)."""
    entries = [(key.removeprefix("sk-demo-"), key, [team] if team else []) for team, key in TEAM_KEYS.items()]
    entries.append(("mobile-app", DEMO_KEY, ["team:search", "team:support"]))
    lines = ["keys:"]
    for name, key, budgets in entries:
        digest = hashlib.sha256(key.encode()).hexdigest()
        lines.append(f'  - {{name: {name}, sha256: "{digest}", budgets: [{", ".join(budgets)}]}}')
    return "\n".join(lines) + "\n"


def expected_spend(planned: list[_Planned], table: Any) -> dict[str, int]:
    """What the planned traffic would cost on cloud, per budget (the example gateway's fake model answers
    with prompt tokens of about a quarter of the bytes and at most 64 output tokens)."""
    totals = dict.fromkeys(BUDGETS, 0)
    for item in planned:
        provider = "anthropic" if item.model.startswith("claude") else "openai"
        cost = table.cost(
            item.model, input_tokens=item.size // 4 + 12, output_tokens=min(item.max_tokens, 64), provider=provider
        ).pico_usd
        for budget in ("global", item.team, KEY_BUDGET if item.key else None):
            if budget:
                totals[budget] += cost
    return totals


BUDGETS = ["global", "team:search", "team:support", KEY_BUDGET]


@dataclass
class DemoConfig:
    duration_s: float = 60.0
    requests: int = 3000
    seed: int = 2026
    keep_running: bool = False
    summary_json: Path | None = None
    concurrency: int = 8


@dataclass
class _Tally:
    """What the demo itself saw, per budget: independent of the pipeline's books."""

    cloud: int = 0
    local: int = 0
    rejected: int = 0
    cost_pico: dict[str, int] = field(default_factory=dict)  # per period
    saved_pico: int = 0


@dataclass
class _Planned:
    at: datetime
    team: str | None
    key: bool
    model: str
    size: int
    max_tokens: int
    insist_on_cloud: bool = False


def _plan(config: DemoConfig, start: datetime) -> list[_Planned]:
    """Requests over the month: a daily rhythm, a burst from team:search on day 20, and a tail into the next month."""
    rng = random.Random(config.seed)
    month_s = (next_month_start(f"{start.year:04d}-{start.month:02d}") - start).total_seconds()
    models = [m for m, weight in MODELS for _ in range(weight)]
    planned: list[_Planned] = []
    while len(planned) < config.requests:
        offset = rng.uniform(0, month_s * 1.02)  # two percent of the traffic lands after the month ends
        hour = ((start + timedelta(seconds=offset)).hour + 24) % 24
        if rng.random() > 0.35 + 0.65 * math.sin(math.pi * max(0, hour - 6) / 16) ** 2 * (6 <= hour <= 22):
            continue  # nights are quiet
        team = rng.choices(list(TEAMS), weights=list(TEAMS.values()))[0]
        key = rng.random() < 0.12
        # The mobile app (its API key) always wants the cloud model: no local fallback.
        size = int(rng.lognormvariate(7, 1)) + 50
        at = start + timedelta(seconds=offset)
        planned.append(_Planned(at, team, key, rng.choice(models), size, rng.choice((128, 256, 512, 1024)), key))
    # Day 20: a batch job of team:search that insists on the cloud model pushes the team over its hard limit.
    burst_at = start + timedelta(days=20)
    for i in range(max(20, config.requests // 15)):
        planned.append(
            _Planned(
                burst_at + timedelta(minutes=i * 2), "team:search", False, "gpt-4.1", 6000, 2048, insist_on_cloud=True
            )
        )
    return sorted(planned, key=lambda p: p.at)


class Demo:
    def __init__(self, settings: Settings, config: DemoConfig) -> None:
        self.settings = settings
        self.config = config
        self.root = Path(settings.data_dir) / "demo"
        self.prefix = f"demo{datetime.now(UTC).strftime('%m%d%H%M%S')}."
        now = datetime.now(UTC)
        self.start = month_start(f"{now.year:04d}-{now.month:02d}")
        self.period = f"{self.start.year:04d}-{self.start.month:02d}"
        self.next_period = _period(next_month_start(self.period))
        seconds = (next_month_start(self.period) - self.start).total_seconds()
        self.speed = seconds / config.duration_s
        self.anchor = now + timedelta(seconds=12)  # the simulated month starts once everything is up
        self.processes: list[WorkerProcess] = []
        self.planned: list[_Planned] = []
        self.broker: Any = None
        self.tallies = {b: _Tally() for b in BUDGETS}
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
                "BUDGETFLOW_VIEW__ADMIT_GRACE_S": repr(0.05 * self.speed),
                "BUDGETFLOW_VIEW__ADMIT_MAX_AGE_S": repr(1 * self.speed),
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

        settings = self.child_settings()
        topics = Topics.from_settings(settings)
        await ensure_topics_now(settings, topics)
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)  # what earlier runs left behind
        self.root.mkdir(parents=True, exist_ok=True)
        from budgetflow.tokenizers import PriceTable

        self.planned = _plan(self.config, self.start)
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
        keys.write_text(gateway_keys())
        self.processes.append(
            _Script(
                "gateway",
                [str(gateway), "--port", str(self.gateway_port), "--keys", str(keys)],
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
    async def drive(self, http: aiohttp.ClientSession, planned: list[_Planned]) -> None:
        from budgetflow.tokenizers import PriceTable

        table = PriceTable.from_settings(self.settings.pricing)
        queue: asyncio.Queue[_Planned | None] = asyncio.Queue(maxsize=self.config.concurrency * 4)

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                await self._send(http, table, item)

        workers = [asyncio.create_task(worker()) for _ in range(self.config.concurrency)]
        malformed_at = {len(planned) // 3, len(planned) // 2, 2 * len(planned) // 3}
        for index, item in enumerate(planned):
            delay = (item.at - self.sim_now()).total_seconds() / self.speed
            if delay > 0:
                await asyncio.sleep(delay)
            await queue.put(item)
            if index in malformed_at:
                await self._malformed()
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)

    async def _send(self, http: aiohttp.ClientSession, table: Any, item: _Planned) -> None:
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
        budgets = [b for b in ("global", item.team, KEY_BUDGET if item.key else None) if b]
        self.sent += 1
        async with http.post(
            f"http://127.0.0.1:{self.gateway_port}/v1/chat/completions", json=body, headers=headers
        ) as response:
            payload = await response.json()
            if response.status == 429:
                for b in budgets:
                    self.tallies[b].rejected += 1
                return
            response.raise_for_status()
            backend = response.headers["X-Budgetflow-Backend"]
            model = response.headers["X-Budgetflow-Model"]
            period = response.headers["X-Budgetflow-Period"]  # the month the gateway stamped on the request
        usage = payload["usage"]
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
        for b in budgets:
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
        from budgetflow.streams.ops.readback import read_topic

        return len(await read_topic(self.child_settings(), f"{self.prefix}dlq"))


def _gateway_script() -> Path:
    here = Path(__file__).resolve().parent.parent / "examples" / "gateway.py"
    if not here.exists():
        raise RuntimeError("the demo runs from a checkout of budgetflow (it starts examples/gateway.py)")
    return here


class _Script(WorkerProcess):
    """A Python script run like a worker (the example gateway)."""

    def __init__(self, role: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        import subprocess
        import sys

        self.role = role
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, *argv], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )


def _period(moment: datetime) -> str:
    return f"{moment.year:04d}-{moment.month:02d}"


def _bar(spend: int, limit: int | None, soft: int, width: int = 28) -> str:
    if not limit:
        return "unlimited".ljust(width)
    filled = min(width, int(spend * width / limit))
    mark = min(width - 1, int(soft * width / 100))
    cells = ["█" if i < filled else "·" for i in range(width)]
    cells[mark] = "│" if mark >= filled else "┃"
    return "".join(cells)


def _live_table(demo: Demo, view: Any) -> Any:
    from rich.table import Table

    now = demo.sim_now()
    table = Table(
        title=f"budgetflow demo · {now:%Y-%m-%d %H:%M} UTC (simulated, {demo.speed:,.0f}× real time)",
        title_justify="left",
        expand=False,
    )
    for column in ("budget", "spend vs limit (│ soft)", "spend", "limit", "status", "cloud", "local", "rejected"):
        table.add_column(
            column, justify="right" if column in ("spend", "limit", "cloud", "local", "rejected") else "left"
        )
    for budget in BUDGETS:
        state = view.status(budget)
        tally = demo.tallies[budget]
        colour = {"normal": "green", "soft_limit": "yellow", "hard_limit": "red"}[state.status]
        served = tally.cloud + tally.local
        table.add_row(
            budget,
            f"[{colour}]{_bar(state.spend_pico, state.limit_pico, state.soft_limit_percent)}[/]",
            "$" + format_usd(state.spend_pico, 2),
            "-" if state.limit_pico is None else "$" + format_usd(state.limit_pico, 2),
            f"[{colour}]{state.status}[/]" + (" (stale)" if state.stale else ""),
            f"{tally.cloud * 100 // served if served else 0} %",
            f"{tally.local * 100 // served if served else 0} %",
            str(tally.rejected),
        )
    return table


async def _run(demo: Demo) -> dict[str, Any]:
    import logging

    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn

    from budgetflow.streams.gateway.view import BudgetView

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its retries are not the demo's business
    console = Console()
    await demo.ensure_broker()
    await demo.start_pipeline()
    planned = demo.planned
    month_end = next_month_start(demo.period)
    progress = Progress(TextColumn("month"), BarColumn(bar_width=40), TextColumn("{task.description}"))
    task = progress.add_task("", total=(month_end - demo.start).total_seconds())
    async with aiohttp.ClientSession() as http:
        await demo.wait_ready(http)
        console.print(
            f"[bold]budgetflow demo[/]: stats API http://127.0.0.1:{demo.web_port}/v1/budgets · "
            f"metrics http://127.0.0.1:{demo.web_port}/metrics and http://127.0.0.1:{demo.metrics_port}/metrics"
            f" · gateway http://127.0.0.1:{demo.gateway_port}/v1/chat/completions"
        )
        async with BudgetView(demo.child_settings()) as view:
            await view.ready(timeout_s=60)
            driving = asyncio.create_task(demo.drive(http, planned))
            # In a terminal the view is live; in a log (CI), a snapshot every simulated week.
            next_snapshot = demo.start + timedelta(days=7)
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while not driving.done():
                    if not console.is_terminal and demo.sim_now() >= next_snapshot:
                        console.print(_live_table(demo, view))
                        next_snapshot += timedelta(days=7)
                    elapsed = max(0.0, (min(demo.sim_now(), month_end) - demo.start).total_seconds())
                    dead = demo.dead_letters
                    progress.update(
                        task,
                        completed=elapsed,
                        description=f"day {elapsed / 86_400:4.1f} · {demo.sent} requests · {dead} dead letters",
                    )
                    live.update(Group(_live_table(demo, view), progress))
                    await asyncio.sleep(0.25)
                    if demo.sent % 50 == 0:
                        demo.dead_letters = await demo.count_dead_letters()
                await driving
                # Past the boundary: wait for the new month's rollover and for the books to close.
                summary = await _settle(demo, http, view, live)
    return summary


async def _settle(demo: Demo, http: aiohttp.ClientSession, view: Any, live: Any) -> dict[str, Any]:
    from rich.console import Group

    deadline = time.monotonic() + 60
    while True:
        rows = {b: await demo.stats(http, b) for b in BUDGETS}
        books = {
            b: {p["period"]: int(p["settled_usd"].replace(".", "")) for p in r.get("periods", [])}
            for b, r in rows.items()
        }
        reserved = any(p["reserved_usd"] != usd_string(0) for r in rows.values() for p in r.get("periods", []))
        rolled = all(b in view._statuses and view._statuses[b].period == demo.next_period for b in BUDGETS)
        exact = all(books[b].get(p, 0) == c for b in BUDGETS for p, c in demo.tallies[b].cost_pico.items())
        live.update(Group(_live_table(demo, view)))
        if (exact and rolled and not reserved) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    demo.dead_letters = await demo.count_dead_letters()
    events = set()
    for b in BUDGETS:
        for p in rows[b].get("periods", []):
            events.add(p["status"])
    transitions = await _transitions(demo)
    return {
        "period": demo.period,
        "requests_sent": demo.sent,
        "malformed_events": demo.malformed,
        "dead_letters": demo.dead_letters,
        "exact": exact,
        "rolled_over": rolled,
        "transitions": sorted(transitions),
        "budgets": {
            b: {
                "pipeline_settled_usd": {p: usd_string(v) for p, v in books[b].items()},
                "demo_counted_usd": {p: usd_string(v) for p, v in demo.tallies[b].cost_pico.items()},
                "status_now": view.status(b).status,
                "cloud": demo.tallies[b].cloud,
                "local": demo.tallies[b].local,
                "rejected": demo.tallies[b].rejected,
                "saved_by_shift_usd": usd_string(demo.tallies[b].saved_pico),
            }
            for b in BUDGETS
        },
    }


async def _transitions(demo: Demo) -> set[str]:
    """Every status a budget moved to this run (from the transition events), rollover to normal included."""
    from budgetflow.schemas.serde import loads
    from budgetflow.streams.ops.readback import read_topic

    seen = set()
    for _, _, value, _ in await read_topic(demo.child_settings(), f"{demo.prefix}budget-events"):
        if value is not None:
            seen.add(loads(value)["event"])
    last: dict[str, str] = {}
    for _, _, value, _ in await read_topic(demo.child_settings(), f"{demo.prefix}budget-status"):
        if value is not None:
            record = loads(value)
            before = last.get(record["budget_id"])
            if record["status"] == "normal" and before in ("soft_limit", "hard_limit"):
                seen.add("normal")  # back to normal: at the rollover, or under the hysteresis band
            last[record["budget_id"]] = record["status"]
    return seen


def _print_summary(summary: dict[str, Any], demo: Demo) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"budgetflow demo · {summary['period']} summary", title_justify="left")
    for column in ("budget", "spend (pipeline)", "counted by the demo", "cloud", "local", "rejected", "saved by shift"):
        table.add_column(column, justify="left" if column == "budget" else "right")

    def usd(text: str) -> str:
        return "$" + format_usd(parse_usd(text), 2)

    for budget, row in summary["budgets"].items():
        month = summary["period"]
        table.add_row(
            budget,
            usd(row["pipeline_settled_usd"].get(month, "0")),
            usd(row["demo_counted_usd"].get(month, "0")),
            str(row["cloud"]),
            str(row["local"]),
            str(row["rejected"]),
            usd(row["saved_by_shift_usd"]),
        )
    console.print(table)
    verdict = "[green]exact to the pico-dollar[/]" if summary["exact"] else "[red]NOT exact[/]"
    console.print(
        f"{summary['requests_sent']} requests through the gateway; pipeline totals vs the demo's own count: "
        f"{verdict}; {summary['dead_letters']} dead letters ({summary['malformed_events']} malformed events "
        f"sent); status changes seen: {', '.join(summary['transitions'])}; "
        f"rolled over to {demo.next_period}: {summary['rolled_over']}"
    )
    saved = sum(int(r["saved_by_shift_usd"].replace(".", "")) for b, r in summary["budgets"].items() if b == "global")
    console.print(f"the soft-limit shift to local models saved ${format_usd(saved, 2)} of cloud spend this month")


def run_demo(config: DemoConfig, settings: Settings | None = None) -> int:
    """Run the demo; 0 when the pipeline's books match the demo's own count exactly."""
    demo = Demo(settings or load_settings(), config)
    code = 1
    try:
        summary = asyncio.run(_run(demo))
        _print_summary(summary, demo)
        if config.summary_json is not None:
            config.summary_json.write_bytes(dumps(summary))
        code = 0 if summary["exact"] and summary["rolled_over"] else 1
        if config.keep_running:
            print(f"still running (stats API http://127.0.0.1:{demo.web_port}/v1/budgets); Ctrl-C stops it")  # noqa: T201
            with contextlib.suppress(KeyboardInterrupt):
                while all(p.alive for p in demo.processes):
                    time.sleep(1)
    except KeyboardInterrupt:
        print("stopping")  # noqa: T201
        code = 130
    finally:
        demo.stop()
    return code
