"""`budgetflow demo`: a month of LLM traffic through the real pipeline, watched live.

It starts what is missing (the local broker), the enrich and aggregate workers
and the example gateway, all on one simulated clock that runs a month in
``--duration`` seconds (every time rule holds in simulated time), applies a
sample policy set, and sends chat requests of varied sizes to several models
through the gateway over HTTP: a daily rhythm, a few malformed events, a
burst that pushes one team over its hard limit, three days with the local model
down (shifted requests fall back to cloud), and the month boundary.
The terminal shows each budget's spend against its limit as it happens; the
summary checks the pipeline's totals against the demo's own count, to the
pico-dollar, and says what the shift to local models saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import Any

import aiohttp

from budgetflow.schemas.money import usd_string
from budgetflow.schemas.periods import next_month_start
from budgetflow.schemas.serde import dumps
from budgetflow.schemas.settings import Settings, load_settings
from budgetflow.streams.dev.demo_pipeline import Demo
from budgetflow.streams.dev.demo_plan import BUDGETS, DemoConfig, local_outage
from budgetflow.streams.dev.demo_screen import live_table, print_summary

__all__ = ["DemoConfig", "run_demo"]


async def _run(demo: Demo) -> dict[str, Any]:
    """Start what is missing, drive the month's traffic while the table follows it, then settle the books."""
    import logging

    from rich.console import Console
    from rich.live import Live

    from budgetflow.streams.gateway.view import BudgetView

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its retries are not the demo's business
    console = Console()
    await demo.ensure_broker()
    await demo.start_pipeline()
    async with aiohttp.ClientSession() as http:
        await demo.wait_ready(http)
        console.print(
            f"[bold]budgetflow demo[/]: stats API http://127.0.0.1:{demo.web_port}/v1/budgets · "
            f"metrics http://127.0.0.1:{demo.web_port}/metrics and http://127.0.0.1:{demo.metrics_port}/metrics"
            f" · gateway http://127.0.0.1:{demo.gateway_port}/v1/chat/completions"
        )
        async with BudgetView(demo.child_settings()) as view:
            await view.ready(timeout_s=60)
            driving = asyncio.create_task(demo.drive(http, demo.planned))
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                await _watch(demo, view, driving, live)
                await driving
                # Past the boundary: wait for the new month's rollover and for the books to close.
                summary = await _settle(demo, http, view, live)
    return summary


async def _watch(demo: Demo, view: Any, driving: asyncio.Task[None], live: Any) -> None:
    """The live table and the month's progress until the traffic is sent."""
    from rich.console import Group
    from rich.progress import BarColumn, Progress, TextColumn

    console = live.console
    month_end = next_month_start(demo.period)
    progress = Progress(TextColumn("month"), BarColumn(bar_width=40), TextColumn("{task.description}"))
    task = progress.add_task("", total=(month_end - demo.start).total_seconds())
    # In a terminal the view is live; in a log (CI), a snapshot every simulated week.
    next_snapshot = demo.start + timedelta(days=7)
    while not driving.done():
        if not console.is_terminal and demo.sim_now() >= next_snapshot:
            console.print(live_table(demo, view))
            next_snapshot += timedelta(days=7)
        elapsed = max(0.0, (min(demo.sim_now(), month_end) - demo.start).total_seconds())
        dead = demo.dead_letters
        progress.update(
            task,
            completed=elapsed,
            description=f"day {elapsed / 86_400:4.1f} · {demo.sent} requests · {dead} dead letters",
        )
        live.update(Group(live_table(demo, view), progress))
        await asyncio.sleep(0.25)
        if demo.sent % 50 == 0:
            demo.dead_letters = await demo.count_dead_letters()


async def _settle(demo: Demo, http: aiohttp.ClientSession, view: Any, live: Any) -> dict[str, Any]:
    """Until the pipeline's books match the demo's count and every budget has rolled over (60 s at most):
    the summary."""
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
        live.update(Group(live_table(demo, view)))
        if (exact and rolled and not reserved) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    demo.dead_letters = await demo.count_dead_letters()
    transitions = await _transitions(demo)
    return {
        "period": demo.period,
        "requests_sent": demo.sent,
        "malformed_events": demo.malformed,
        "dead_letters": demo.dead_letters,
        "exact": exact,
        "rolled_over": rolled,
        "transitions": sorted(transitions),
        "local_outage": [moment.isoformat() for moment in local_outage(demo.start)],
        "budgets": {
            b: {
                "pipeline_settled_usd": {p: usd_string(v) for p, v in books[b].items()},
                "demo_counted_usd": {p: usd_string(v) for p, v in demo.tallies[b].cost_pico.items()},
                "status_now": view.status(b).status,
                "cloud": demo.tallies[b].cloud,
                "local": demo.tallies[b].local,
                "rejected": demo.tallies[b].rejected,
                "fallbacks": demo.tallies[b].fallbacks,
                "unserved": demo.tallies[b].unserved,
                "saved_by_shift_usd": usd_string(demo.tallies[b].saved_pico),
            }
            for b in BUDGETS
        },
    }


async def _transitions(demo: Demo) -> set[str]:
    """Every status a budget moved to this run (from the transition events), rollover to normal included."""
    from budgetflow.schemas.serde import loads
    from budgetflow.streams.kafka.follow import read_topic

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


def run_demo(config: DemoConfig, settings: Settings | None = None) -> int:
    """Run the demo; 0 when the pipeline's books match the demo's own count exactly."""
    demo = Demo(settings or load_settings(), config)
    code = 1
    try:
        summary = asyncio.run(_run(demo))
        print_summary(summary, demo)
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
